//! `tokenizer_config.json` from arbitrary bytes: errors are fine, panics are not.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use myriad_gateway::TokenizerConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = TokenizerConfig::parse(text, Path::new("fuzz/tokenizer_config.json"));
});
