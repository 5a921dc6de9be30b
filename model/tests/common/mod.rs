//! Shared test helpers: fixture paths, self-cleaning temp dirs, and independent safetensors
//! reading / writing through the `safetensors` crate (not through the code under test).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub const FIXTURES: [&str; 4] = [
    "qwen3_next-tiny",
    "qwen3_next-mini512",
    "qwen3_5_moe-tiny",
    "qwen3_5_moe-mini512",
];

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures"
    ))
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "myriad-model-test-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn copy_dir(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

/// One tensor held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn f32s(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
            other => panic!("f32s of {other:?}"),
        }
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// The weight files of a checkpoint directory: file name → tensors.
pub fn weight_files(dir: &Path) -> Vec<String> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index);
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        vec!["model.safetensors".to_string()]
    }
}

pub fn read_file_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = Tensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            (name, t)
        })
        .collect()
}

/// Every tensor of a checkpoint directory (all shards).
pub fn read_all(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for f in weight_files(dir) {
        out.extend(read_file_tensors(&dir.join(f)));
    }
    out
}

pub fn write_file_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// Writes `tensors` as a single-file checkpoint into `dir` next to a copy of `config_from`'s
/// config.json.
pub fn write_single(dir: &Path, config_from: &Path, tensors: &BTreeMap<String, Tensor>) {
    std::fs::copy(config_from.join("config.json"), dir.join("config.json")).unwrap();
    write_file_tensors(&dir.join("model.safetensors"), tensors);
}
