//! A `model.safetensors` of arbitrary bytes next to a valid tiny config: opening and loading
//! every tensor may fail with an error but must never panic or read out of bounds.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use myriad_model::{Checkpoint, Family, Preset};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("myriad-fuzz-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let config = Preset::Tiny.config(Family::Qwen35Moe);
    if std::fs::write(d.join("model.safetensors"), data).is_err() {
        return;
    }
    let Ok(ckpt) = Checkpoint::open(d, &config) else { return };
    let _ = ckpt.embed_tokens().map(|t| t.to_f32());
    let _ = ckpt.lm_head();
    let _ = ckpt.final_norm();
    for l in 0..config.num_layers {
        let _ = ckpt.layer(l);
        for e in 0..config.num_experts {
            let _ = ckpt.expert(l, e).map(|t| t.gate_proj.to_f32());
        }
    }
});
