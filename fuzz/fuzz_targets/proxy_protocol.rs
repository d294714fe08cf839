//! Fuzz target: any bytes as the start of a connection from a trusted upstream, through the
//! PROXY header parser. The properties checked for each input are those of
//! `fuzz/proxy_protocol_check.rs` (shared with the property tests): no panic, a complete
//! header of exactly its length within its cap, canonical addresses that survive re-encoding,
//! errors that more bytes do not change.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../proxy_protocol_check.rs"]
mod proxy_protocol_check;

fuzz_target!(|data: &[u8]| {
    proxy_protocol_check::check(data);
});
