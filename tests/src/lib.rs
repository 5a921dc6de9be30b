//! Shared helpers for the integration tests: where the fixtures are, reading their reference
//! tensors, loading an engine on them, and comparing numbers with useful failure messages.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use myriad::local::{LocalEngine, LocalOptions, load};
use safetensors::{Dtype, SafeTensors};

/// The public fixtures shipped beside the repository.
pub const FIXTURES: [&str; 4] = [
    "qwen3_next-tiny",
    "qwen3_next-mini512",
    "qwen3_5_moe-tiny",
    "qwen3_5_moe-mini512",
];

/// `../shared/fixtures` next to the repository.
pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_root().join(name)
}

/// Fixtures kept in this repository (`tests/fixtures/README.md`): shapes the public ones lack.
pub const REPO_FIXTURES: [&str; 2] = ["qwen3_next-tiny-yarn", "qwen3_5_moe-tiny-yarn"];

pub fn repo_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The public fixtures, the repository's, and any directories in `MYRIAD_EXTRA_FIXTURES`
/// (colon-separated; made by `make_fixtures.py` with other seeds, prompts and shapes).
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = FIXTURES.iter().map(|n| fixture(n)).collect();
    dirs.extend(REPO_FIXTURES.iter().map(|n| repo_fixture(n)));
    if let Some(extra) = std::env::var_os("MYRIAD_EXTRA_FIXTURES") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs
}

/// Loads a fixture with all roles in one process (2 threads, best ISA).
pub fn engine(dir: &Path) -> LocalEngine {
    load(
        dir,
        &LocalOptions {
            threads: 2,
            ..LocalOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

/// A tensor read from `reference.safetensors`, widened to f32.
#[derive(Clone, Debug)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// `reference.safetensors` and `reference.json` of a fixture.
pub struct Reference {
    bytes: Vec<u8>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(dir: &Path) -> Self {
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let json =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        Reference { bytes, json }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    /// A float tensor (F32 or BF16) as f32, or None when not stored.
    pub fn f32(&self, name: &str) -> Option<RefTensor> {
        let st = self.st();
        let t = st.tensor(name).ok()?;
        let data = match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        Some(RefTensor {
            shape: t.shape().to_vec(),
            data,
        })
    }

    /// An integer tensor as ids, or None when not stored.
    pub fn ids(&self, name: &str) -> Option<Vec<u32>> {
        let st = self.st();
        let t = st.tensor(name).ok()?;
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        Some(
            t.data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect(),
        )
    }

    pub fn num_prompts(&self) -> usize {
        self.json["prompts"].as_array().map_or(0, |a| a.len())
    }

    pub fn debug_prompt(&self) -> usize {
        self.json["debug"]["prompt_index"].as_u64().unwrap_or(2) as usize
    }
}

/// Largest absolute difference; NaN if either side has a NaN (so it can never pass a check).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Row-wise natural-log softmax of `[rows, cols]`.
pub fn log_softmax_rows(x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks_exact(cols)
        .flat_map(myriad_attention::sampling::log_softmax)
        .collect()
}

/// Collects failed checks so a test reports all of them at once.
#[derive(Default)]
pub struct Report {
    lines: Vec<String>,
    checks: usize,
    /// Worst `diff / tolerance` seen per kind of check (first word of `what` after digits).
    worst: std::collections::BTreeMap<String, (f32, f32)>,
}

impl Report {
    /// Records a check of `what`: `|got − want| ≤ tol` elementwise.
    pub fn close(&mut self, what: &str, got: &[f32], want: &[f32], tol: f32) {
        self.checks += 1;
        if got.len() != want.len() {
            self.lines.push(format!(
                "{what}: length {} vs reference {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let d = max_abs_diff(got, want);
        let kind: String = what
            .split(|c: char| c.is_ascii_digit())
            .filter(|p| !p.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ");
        let e = self.worst.entry(kind).or_insert((0.0, tol));
        if d / tol > e.0 / e.1 || e.0 == 0.0 {
            *e = (d.max(e.0 * tol / e.1), tol);
        }
        if d.is_nan() || d > tol {
            self.lines
                .push(format!("{what}: max abs diff {d:.3e} > {tol:.1e}"));
        }
    }

    pub fn equal<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        self.checks += 1;
        if got != want {
            self.lines
                .push(format!("{what}: got {got:?}, reference {want:?}"));
        }
    }

    pub fn fail(&mut self, line: String) {
        self.checks += 1;
        self.lines.push(line);
    }

    pub fn checks(&self) -> usize {
        self.checks
    }

    /// Panics listing every failure.
    pub fn finish(self, title: &str) {
        for (kind, (d, tol)) in &self.worst {
            eprintln!("{title}: worst {kind}: {d:.2e} (tolerance {tol:.0e})");
        }
        assert!(self.checks > 0, "{title}: no checks ran");
        assert!(
            self.lines.is_empty(),
            "{title}: {} of {} checks failed:\n  {}",
            self.lines.len(),
            self.checks,
            self.lines.join("\n  ")
        );
    }
}
