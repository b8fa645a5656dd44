//! Passwords (argon2id) and access tokens (HS256 JWTs) shared by the services: the
//! user service issues tokens, trade and notification verify them with the same
//! secret.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("EXCHANGE_JWT_SECRET must be at least 32 bytes (it is {0})")]
    WeakSecret(usize),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("invalid token: {0}")]
    Token(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: i64,
    pub name: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_seconds: i64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_seconds: i64) -> Result<Tokens, AuthError> {
        if secret.len() < 32 {
            return Err(AuthError::WeakSecret(secret.len()));
        }
        Ok(Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl_seconds,
        })
    }

    pub fn ttl_seconds(&self) -> i64 {
        self.ttl_seconds
    }

    pub fn issue(&self, user_id: i64, name: &str, now_s: i64) -> Result<String, AuthError> {
        let claims = Claims {
            sub: user_id,
            name: name.to_string(),
            iat: now_s,
            exp: now_s + self.ttl_seconds,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Token(e.to_string()))
    }

    /// Checks signature, algorithm and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| AuthError::Token(e.to_string()))
    }
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// False for a wrong password and for a hash that does not parse.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let tokens = Tokens::new(SECRET, 60).expect("secret");
        let now = crate::now_ms() / 1000;
        let token = tokens.issue(7, "ada", now).expect("issue");
        let claims = tokens.verify(&token).expect("verify");
        assert_eq!((claims.sub, claims.name.as_str()), (7, "ada"));
        let other = Tokens::new(b"another-secret-another-secret-xx", 60).expect("secret");
        assert!(
            other.verify(&token).is_err(),
            "a token signed with another secret must fail"
        );
        let expired = tokens.issue(7, "ada", now - 3600).expect("issue");
        assert!(
            tokens.verify(&expired).is_err(),
            "an expired token must fail"
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            Tokens::new(b"short", 60),
            Err(AuthError::WeakSecret(5))
        ));
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct hors", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn bearer_parses_the_scheme_case_insensitively() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
