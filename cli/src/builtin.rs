//! The built-in model used when no `--model` is given: made on first use into a cache
//! directory, so a fresh machine can run everything with nothing downloaded.

use std::path::PathBuf;

use anyhow::{Context, Result};
use myriad_kernels::WeightDtype;
use myriad_model::{Family, Preset};

use crate::cmd::make_model::make_model;

/// The cache root: `$MYRIAD_CACHE`, else `$XDG_CACHE_HOME/myriad`, else `~/.cache/myriad`,
/// else the system temp directory.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("MYRIAD_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("myriad");
    }
    if let Some(p) = std::env::var_os("HOME") {
        return PathBuf::from(p).join(".cache").join("myriad");
    }
    std::env::temp_dir().join("myriad")
}

/// Directory of a built-in model, made if missing. Version the name so a changed generator
/// never reuses an old directory.
pub fn ensure(preset: Preset, family: Family) -> Result<PathBuf> {
    let name = format!("builtin-v1-{}-{}-seed0", family.model_type(), preset.name());
    let dir = cache_root().join("models").join(&name);
    if dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file() {
        return Ok(dir);
    }
    let parent = cache_root().join("models");
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    // Build beside the final place and rename, so a crash never leaves a half-written model.
    let tmp = parent.join(format!("{name}.tmp-{}", std::process::id()));
    eprintln!(
        "making the built-in {} model in {} (first use only)",
        preset.name(),
        dir.display()
    );
    let started = std::time::Instant::now();
    make_model(preset, family, &tmp, 0, WeightDtype::BF16, 1 << 30, None)?;
    eprintln!("made it in {:.1}s", started.elapsed().as_secs_f64());
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race: use its copy.
        Err(_) if dir.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving {} to {}", tmp.display(), dir.display())),
    }
}

/// The default model of `generate` and `serve`: Qwen3.5-MoE, mini512 shape (512 experts,
/// top-10, as the real 397B model routes).
pub fn default_model() -> Result<PathBuf> {
    ensure(Preset::Mini512, Family::Qwen35Moe)
}
