//! The user service: register, log in (argon2id, HS256 JWT), `GET /users/me`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;

use crate::auth::{Tokens, hash_password, verify_password};
use crate::service::{ApiError, authenticate, json, parse_json};
use crate::store::{Store, StoreError};

pub struct UserState {
    pub store: Store,
    pub tokens: Tokens,
}

pub fn router(state: Arc<UserState>) -> Router {
    Router::new()
        .route("/register", post(register))
        .route("/login", post(login))
        .route("/users/me", get(me))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    username: String,
    password: String,
}

fn check_username(name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !(3..=64).contains(&name.len()) || !ok_chars {
        return Err(ApiError::field(
            "username",
            "must be 3 to 64 characters of letters, digits, '_', '.' or '-'",
        ));
    }
    Ok(())
}

async fn register(State(st): State<Arc<UserState>>, body: Bytes) -> Result<Response, ApiError> {
    let creds: Credentials = parse_json(&body)?;
    check_username(&creds.username)?;
    if !(8..=256).contains(&creds.password.chars().count()) {
        return Err(ApiError::field("password", "must be 8 to 256 characters"));
    }
    let password = creds.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    match st.store.create_user(&creds.username, &hash).await {
        Ok(id) => {
            tracing::info!(user_id = id, username = %creds.username, "registered");
            Ok(json(
                StatusCode::CREATED,
                serde_json::json!({"id": id, "username": creds.username}),
            ))
        }
        Err(StoreError::Conflict) => Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: format!("username {:?} is taken", creds.username),
            field: Some("username".into()),
        }),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn login(State(st): State<Arc<UserState>>, body: Bytes) -> Result<Response, ApiError> {
    let creds: Credentials = parse_json(&body)?;
    let user = st
        .store
        .user_by_name(&creds.username)
        .await
        .map_err(ApiError::internal)?;
    // Unknown users still cost a hash check, so timing does not reveal who exists.
    let hash = user.as_ref().map(|u| u.password_hash.clone());
    let password = creds.password;
    let ok = tokio::task::spawn_blocking(move || {
        let hash = hash.unwrap_or_else(|| {
            DUMMY_HASH
                .get_or_init(|| hash_password("no such user, no such password").unwrap_or_default())
                .clone()
        });
        verify_password(&password, &hash)
    })
    .await
    .map_err(ApiError::internal)?;
    let Some(user) = user.filter(|_| ok) else {
        return Err(ApiError::unauthorized("wrong username or password"));
    };
    let token = st
        .tokens
        .issue(user.id, &user.username, crate::now_ms() / 1000)
        .map_err(ApiError::internal)?;
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"token": token, "tokenType": "Bearer", "expiresIn": st.tokens.ttl_seconds(), "userId": user.id}),
    ))
}

/// A real argon2id hash checked against for unknown users: same work as a wrong password.
static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn me(State(st): State<Arc<UserState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let claims = authenticate(&headers, &st.tokens)?;
    let user = st
        .store
        .user_by_id(claims.sub)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"id": user.id, "username": user.username, "createdMs": user.created_ms}),
    ))
}
