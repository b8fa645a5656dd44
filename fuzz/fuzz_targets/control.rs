//! The proxy's control-socket protocol: a request line as the proxy reads it, and a
//! routing table it is handed compiled as the proxy compiles it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<baton_proxy_api::control::Request>(data)
        && let baton_proxy_api::control::Request::SetTable { table } = req
    {
        baton_proxy::fuzzing::table(&table);
    }
});
