//! Alertmanager webhook bodies (the control API's and the operator's `/alerts`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = baton_driver::alerts::parse(data);
});
