//! A streaming safetensors writer: the header (dtype, shape, offsets of every tensor of the
//! shard, in write order) goes first, then each tensor's bytes are appended as they are
//! produced, so no more than one chunk of a tensor is ever in memory.
//!
//! Format: 8-byte little-endian header length, JSON header (with
//! `"__metadata__": {"format": "pt"}`) padded with spaces to a multiple of 8, then the data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use myriad_kernels::WeightDtype;
use serde_json::{Map, Value, json};

use super::SynthError;
use super::plan::Planned;

/// The serialised header of a shard holding `tensors` in this order.
pub(crate) fn header(tensors: &[&Planned]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.bytes();
        let dtype = match t.dtype {
            WeightDtype::BF16 => "BF16",
            WeightDtype::F32 => "F32",
        };
        map.insert(
            t.name.clone(),
            json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    // The data section should start 8-byte aligned, as the reference writer pads it.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// An open shard file that must receive exactly the bytes its header announced.
pub(crate) struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    remaining: u64,
}

impl ShardWriter {
    pub(crate) fn create(path: &Path, tensors: &[&Planned]) -> Result<ShardWriter, SynthError> {
        let io = |source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&header(tensors)).map_err(io)?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            out,
            remaining: tensors.iter().map(|t| t.bytes()).sum(),
        })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), SynthError> {
        let n = bytes.len() as u64;
        if n > self.remaining {
            return Err(self.overrun());
        }
        self.remaining -= n;
        self.out.write_all(bytes).map_err(|source| SynthError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub(crate) fn finish(mut self) -> Result<(), SynthError> {
        if self.remaining != 0 {
            return Err(self.overrun());
        }
        let io = |source| SynthError::Io {
            path: self.path.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)
    }

    fn overrun(&self) -> SynthError {
        SynthError::Internal(format!(
            "{}: data does not match the header ({} bytes left)",
            self.path.display(),
            self.remaining
        ))
    }
}
