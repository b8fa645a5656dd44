//! `baton convert` (Argo Rollouts and Flagger resources into Baton Rollouts): any text
//! gets converted Rollouts or an error, never a panic; what it converts serialises.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(converted) = baton_k8s::convert::convert(text) {
            for c in &converted {
                assert!(serde_json::to_string(&c.rollout).is_ok());
            }
        }
    }
});
