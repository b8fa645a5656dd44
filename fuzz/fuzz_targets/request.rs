//! A client's request head through the proxy's own handling (Host rules, upgrade check,
//! the pick of a revision, hop-by-hop stripping) and out as the head sent to an
//! instance, which must read back as the same single request.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    baton_proxy::fuzzing::request(data);
});
