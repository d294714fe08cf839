//! Fuzz target: any bytes as a config file. The properties checked for each input are those
//! of `fuzz/config_check.rs` (shared with the property tests): no panic, one-line messages that
//! name the file and the key, and an accepted config that survives being read back from its
//! effective JSON.
//!
//! `Config::load` reads files as UTF-8 and rejects anything else before parsing, so only
//! UTF-8 inputs reach the parser; the others are skipped.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../config_check.rs"]
mod config_check;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        config_check::check(text);
    }
});
