//! Listener addresses compared as the kernel does, not as text: `0.0.0.0:8080`,
//! `127.0.0.1:8080` and `127.0.0.1:08080` all want port 8080 on loopback.

use std::net::SocketAddr;

/// Whether two `listen` addresses cannot both be bound: the same port, and the same
/// address or either one a wildcard. Text that does not parse clashes only with the
/// same text (the validator names it anyway).
pub fn clash(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(x), Ok(y)) => {
            x.port() == y.port()
                && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
        }
        _ => a == b,
    }
}

/// The addresses a rollout listens on: its traffic listener and a blue-green preview.
pub fn listeners(r: &crate::Rollout) -> Vec<String> {
    let mut v = vec![r.spec.traffic.listen.clone()];
    if let Some(bg) = &r.spec.strategy.blue_green
        && let Some(p) = &bg.preview_listen
    {
        v.push(p.clone());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::clash;

    #[test]
    fn addresses_clash_by_port_and_address_not_by_text() {
        assert!(clash("127.0.0.1:8080", "127.0.0.1:08080"));
        assert!(clash("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(clash("127.0.0.1:8080", "[::]:8080"));
        assert!(clash("[::1]:8080", "[0:0::1]:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.2:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.1:8081"));
        assert!(clash("not an address", "not an address"));
    }
}
