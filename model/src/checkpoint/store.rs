//! The safetensors files of a checkpoint: which file holds which tensor, and lazily
//! memory-mapped, validated shards.
//!
//! A sharded checkpoint is described by `model.safetensors.index.json`; a shard is opened,
//! mapped and its header parsed only when one of its tensors is first requested, so a process
//! that needs a subset of the experts never touches the other shards. The header is parsed by
//! the `safetensors` crate, whose offset validation is what catches a truncated file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use super::CheckpointError;

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor as stored: its dtype, shape and bytes inside the mapped file.
#[derive(Clone, Debug)]
pub(crate) struct RawTensor<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

struct Mapped {
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

struct Shard {
    path: PathBuf,
    mapped: OnceLock<Mapped>,
}

pub(crate) struct Store {
    /// The file that lists the tensors (index or single file), for messages.
    listing: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    names: HashMap<String, usize>,
}

impl Store {
    pub(crate) fn open(dir: &Path) -> Result<Store, CheckpointError> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, index);
        }
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mapped = map_file(&single)?;
        let names = mapped.tensors.keys().map(|n| (n.clone(), 0)).collect();
        let shard = Shard {
            path: single.clone(),
            mapped: OnceLock::from(mapped),
        };
        Ok(Store {
            listing: single,
            shards: vec![shard],
            names,
        })
    }

    fn open_index(dir: &Path, index: PathBuf) -> Result<Store, CheckpointError> {
        let bad = |reason: String| CheckpointError::Index {
            path: index.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&index).map_err(|source| CheckpointError::Io {
            path: index.clone(),
            source,
        })?;
        let root: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let Some(map) = root.get("weight_map").and_then(Value::as_object) else {
            return Err(bad("no `weight_map` object".into()));
        };
        let mut shards: Vec<Shard> = Vec::new();
        let mut by_file: HashMap<&str, usize> = HashMap::new();
        let mut names = HashMap::with_capacity(map.len());
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(bad(format!("`weight_map.{tensor}` is not a file name")));
            };
            // Shards live next to the index; anything else would read outside the model.
            if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.')
            {
                return Err(bad(format!(
                    "`weight_map.{tensor}`: `{file}` is not a plain file name"
                )));
            }
            let slot = *by_file.entry(file).or_insert_with(|| {
                shards.push(Shard {
                    path: dir.join(file),
                    mapped: OnceLock::new(),
                });
                shards.len() - 1
            });
            names.insert(tensor.clone(), slot);
        }
        Ok(Store {
            listing: index,
            shards,
            names,
        })
    }

    /// The index file or the single weights file.
    pub(crate) fn listing(&self) -> &Path {
        &self.listing
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The stored tensor `name`, mapping its shard first if needed.
    pub(crate) fn get<'s>(&'s self, name: &str) -> Result<RawTensor<'s>, CheckpointError> {
        let Some((key, &slot)) = self.names.get_key_value(name) else {
            return Err(CheckpointError::MissingTensor {
                tensor: name.to_string(),
                location: self.listing.display().to_string(),
            });
        };
        let shard = &self.shards[slot];
        let mapped = shard.mapped()?;
        let Some(info) = mapped.tensors.get(name) else {
            return Err(CheckpointError::NotInShard {
                tensor: name.to_string(),
                path: shard.path.clone(),
            });
        };
        let (start, end) = info.data_offsets;
        // The safetensors crate checked that all offsets lie within the file.
        let bytes = mapped
            .mmap
            .get(mapped.data_start + start..mapped.data_start + end)
            .ok_or_else(|| CheckpointError::Parse {
                path: shard.path.clone(),
                source: SafeTensorError::InvalidOffset(name.to_string()),
            })?;
        Ok(RawTensor {
            name: key,
            path: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            bytes,
        })
    }
}

impl Shard {
    fn mapped(&self) -> Result<&Mapped, CheckpointError> {
        if let Some(m) = self.mapped.get() {
            return Ok(m);
        }
        // Two threads may both map the file; one result wins and the other is dropped.
        let fresh = map_file(&self.path)?;
        Ok(self.mapped.get_or_init(|| fresh))
    }
}

fn map_file(path: &Path) -> Result<Mapped, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let parse = |source| CheckpointError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(parse(SafeTensorError::HeaderTooSmall));
    }
    // SAFETY: the mapping is read-only. Like every mmap-based loader we rely on nobody
    // truncating or rewriting the weight files while the process runs.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    let (header_len, metadata): (usize, Metadata) =
        SafeTensors::read_metadata(&mmap).map_err(parse)?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok(Mapped {
        mmap,
        data_start: 8 + header_len,
        tensors,
    })
}
