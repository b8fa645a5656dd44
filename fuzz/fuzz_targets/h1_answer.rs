//! The proxy's own HTTP/1.1 answer parsing (heads and framing from instances, which
//! may misbehave): a head, a "need more", or a refusal, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    baton_proxy::fuzzing::answer_head(data);
});
