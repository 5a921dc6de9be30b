//! `config.json` and `generation_config.json` from arbitrary bytes: parse errors are fine,
//! panics are not; whatever parses must validate and round-trip through `to_hf_json`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use myriad_model::{GenerationConfig, ModelConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let origin = Path::new("fuzz/config.json");
    if let Ok(c) = ModelConfig::from_json_str(text, origin) {
        assert!(c.validate().is_ok());
        let again = ModelConfig::from_json_str(&c.to_hf_json().to_string(), origin).expect("round trip");
        assert_eq!(again, c);
        let _ = GenerationConfig::from_json_str(text, Path::new("fuzz/generation_config.json"), &c);
    }
});
