//! The spec parser and validator (`baton validate`, `baton apply`, the control API's
//! rollout bodies): any text gets a result or a list of field errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match baton_spec::parse(text) {
            Ok(rollouts) => {
                for r in &rollouts {
                    let _ = baton_spec::validate::validate(r);
                }
            }
            Err(e) => assert!(!e.0.is_empty(), "an error names at least one field"),
        }
    }
});
