//! Tensors on the wire: a dtype byte, a `[rows, cols]` shape, then the row-major elements as
//! raw little-endian bytes, so a receiver can use them without parsing each element.
//!
//! ```text
//! dtype u8 (0 = f32, 1 = bf16) | rows u32 | cols u32 | rows × cols × size bytes
//! ```

use half::bf16;

use super::WireError;
use super::codec::{Put, Reader};
use super::limits::Limits;

/// The element type of a [`WireTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TensorDtype {
    F32 = 0,
    BF16 = 1,
}

impl TensorDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::F32 => 4,
            TensorDtype::BF16 => 2,
        }
    }

    pub fn from_u8(v: u8) -> Option<TensorDtype> {
        match v {
            0 => Some(TensorDtype::F32),
            1 => Some(TensorDtype::BF16),
            _ => None,
        }
    }
}

/// A row-major matrix as raw little-endian bytes (`data.len() == rows * cols * dtype.size()`
/// for every tensor a decoder returns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireTensor {
    pub dtype: TensorDtype,
    pub rows: u32,
    pub cols: u32,
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Encodes `values` (`rows × cols`, row-major) as `dtype`; bf16 rounds to nearest even
    /// (as `half::bf16::from_f32`).
    ///
    /// # Panics
    /// If `values.len() != rows * cols` (a bug in the caller, never peer data).
    pub fn from_f32(rows: u32, cols: u32, values: &[f32], dtype: TensorDtype) -> Self {
        assert_eq!(
            Some(values.len()),
            (rows as usize).checked_mul(cols as usize),
            "WireTensor::from_f32: {} values for a {rows}x{cols} tensor",
            values.len()
        );
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            TensorDtype::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            TensorDtype::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
        }
        WireTensor {
            dtype,
            rows,
            cols,
            data,
        }
    }

    /// The elements widened to `f32` (exact for both dtypes).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            TensorDtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            TensorDtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }

    /// Elements (`rows × cols`).
    pub fn len(&self) -> usize {
        self.rows as usize * self.cols as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(9 + self.data.len());
        out.put_u8(self.dtype as u8);
        out.put_u32(self.rows);
        out.put_u32(self.cols);
        out.extend_from_slice(&self.data);
    }

    /// Decodes a tensor; shape and byte count are checked against `limits` and the bytes left
    /// before the data is copied.
    pub(crate) fn decode(
        r: &mut Reader<'_>,
        names: &TensorFields,
        limits: &Limits,
    ) -> Result<Self, WireError> {
        let raw = r.u8(names.dtype)?;
        let dtype = TensorDtype::from_u8(raw).ok_or_else(|| WireError::Malformed {
            what: names.dtype,
            detail: format!("unknown dtype {raw}"),
        })?;
        let rows = r.u32_max(names.rows, limits.max_rows)?;
        let cols = r.u32_max(names.cols, limits.max_cols)?;
        // Limits are u32, so rows × cols × size can exceed u64 when they are raised to u32::MAX.
        let bytes = u64::from(rows)
            .checked_mul(u64::from(cols))
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(|| WireError::Malformed {
                what: names.data,
                detail: format!("{rows} × {cols} × {} bytes overflows", dtype.size()),
            })?;
        let data = r.bytes(bytes, names.data)?.to_vec();
        Ok(WireTensor {
            dtype,
            rows,
            cols,
            data,
        })
    }
}

/// The field names a tensor's decode errors use (`ExpertRequest.hidden.rows`, …).
#[derive(Debug)]
pub(crate) struct TensorFields {
    pub dtype: &'static str,
    pub rows: &'static str,
    pub cols: &'static str,
    pub data: &'static str,
}

/// [`TensorFields`] under a field path given as a string literal.
macro_rules! tensor_fields {
    ($path:literal) => {
        $crate::tensor::TensorFields {
            dtype: concat!($path, ".dtype"),
            rows: concat!($path, ".rows"),
            cols: concat!($path, ".cols"),
            data: concat!($path, ".data"),
        }
    };
}
pub(crate) use tensor_fields;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_and_bf16_round_trip() {
        let v = [1.0f32, -2.5, 0.1, f32::MAX, 3.0e-39, -0.0];
        let t = WireTensor::from_f32(2, 3, &v, TensorDtype::F32);
        assert_eq!(t.data.len(), 24);
        assert_eq!(t.to_f32(), v);
        let b = WireTensor::from_f32(3, 2, &v, TensorDtype::BF16);
        assert_eq!(b.data.len(), 12);
        let want: Vec<f32> = v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect();
        assert_eq!(b.to_f32(), want);
    }
}
