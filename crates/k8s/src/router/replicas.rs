//! No traffic router: a canary's weight is its share of the pods behind the one
//! Service. The canary gets `ceil(replicas × weight / 100)` pods beside stable's full
//! set, and a weight counts as served once that many canary pods are ready.

/// Canary pods for a weight (at least one while a canary is in flight, so that it can
/// become ready before it takes a share).
pub fn canary_replicas(replicas: u32, weight: u32) -> u32 {
    (replicas * weight).div_ceil(100).clamp(1, replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_up_and_never_vanish() {
        assert_eq!(canary_replicas(10, 0), 1);
        assert_eq!(canary_replicas(10, 5), 1);
        assert_eq!(canary_replicas(10, 25), 3);
        assert_eq!(canary_replicas(4, 100), 4);
    }
}
