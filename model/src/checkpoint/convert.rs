//! Stored dtypes → the two weight dtypes the kernels take (spec §3.3, §3.6).
//!
//! BF16 and F32 pass through without copying. F16 widens to F32 (exact). F8_E4M3 with 128×128
//! block scales is dequantised in f32 and rounded to BF16 (round-to-nearest-even), which is
//! what the FP8 releases' reference dequantisation produces at bf16 activation precision.

use std::borrow::Cow;

use myriad_kernels::WeightDtype;
use safetensors::Dtype;

/// Side of the square FP8 quantisation blocks.
pub const FP8_BLOCK: usize = 128;

/// What the caller wants a tensor as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// BF16 or F32, whichever loses nothing (F8 → BF16).
    Weight,
    /// Always F32 (`A_log`: exp of a bf16 value loses precision).
    F32,
}

/// The block scales covering one `[rows, cols]` slab of an F8 tensor.
pub(crate) struct ScaleGrid {
    /// `[ceil(rows / 128), ceil(cols / 128)]`, row-major.
    pub values: Vec<f32>,
    pub cols: usize,
}

/// A run of whole rows of one slab, as stored.
pub(crate) struct Rows<'a> {
    pub dtype: Dtype,
    pub bytes: &'a [u8],
    pub cols: usize,
    /// Row index of the first row inside its slab (selects the scale-block row).
    pub first_row: usize,
}

/// Why a dtype cannot be converted (the caller adds the tensor and file).
#[derive(Debug)]
pub(crate) enum ConvertError {
    Unsupported,
    NeedsScale,
}

/// Whether `dtype` is readable as a float at all (for scale tensors and A_log).
pub(crate) fn is_supported(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::BF16 | Dtype::F32 | Dtype::F16 | Dtype::F8_E4M3
    )
}

pub(crate) fn convert<'a>(
    rows: Rows<'a>,
    scales: Option<&ScaleGrid>,
    want: Want,
) -> Result<(WeightDtype, Cow<'a, [u8]>), ConvertError> {
    match (rows.dtype, want) {
        (Dtype::BF16, Want::Weight) => Ok((WeightDtype::BF16, Cow::Borrowed(rows.bytes))),
        (Dtype::F32, _) => Ok((WeightDtype::F32, Cow::Borrowed(rows.bytes))),
        (Dtype::BF16, Want::F32) => Ok((
            WeightDtype::F32,
            f32_bytes(rows.bytes.chunks_exact(2).map(bf16_le)),
        )),
        (Dtype::F16, _) => Ok((
            WeightDtype::F32,
            f32_bytes(rows.bytes.chunks_exact(2).map(f16_le)),
        )),
        (Dtype::F8_E4M3, _) => {
            let grid = scales.ok_or(ConvertError::NeedsScale)?;
            let values = dequant_e4m3(&rows, grid);
            Ok(match want {
                Want::Weight => (WeightDtype::BF16, bf16_bytes(values)),
                Want::F32 => (WeightDtype::F32, f32_bytes(values)),
            })
        }
        _ => Err(ConvertError::Unsupported),
    }
}

/// Reads a small float tensor (block scales) as f32 values.
pub(crate) fn read_f32s(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(bytes.chunks_exact(4).map(f32_le).collect()),
        Dtype::BF16 => Some(bytes.chunks_exact(2).map(bf16_le).collect()),
        Dtype::F16 => Some(bytes.chunks_exact(2).map(f16_le).collect()),
        _ => None,
    }
}

fn dequant_e4m3<'a>(rows: &'a Rows<'_>, grid: &'a ScaleGrid) -> impl Iterator<Item = f32> + 'a {
    let cols = rows.cols.max(1);
    rows.bytes.iter().enumerate().map(move |(i, &q)| {
        let (r, c) = (rows.first_row + i / cols, i % cols);
        let scale = grid
            .values
            .get((r / FP8_BLOCK) * grid.cols + c / FP8_BLOCK)
            .copied()
            .unwrap_or(f32::NAN);
        e4m3_to_f32(q) * scale
    })
}

/// OCP FP8 E4M3 ("FN": no infinities, S.1111.111 is NaN), exponent bias 7.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = u32::from((byte >> 3) & 0x0f);
    let man = u32::from(byte & 0x07);
    let magnitude = if exp == 0x0f && man == 0x07 {
        f32::NAN
    } else if exp == 0 {
        man as f32 / 512.0 // subnormal: m/8 · 2^-6
    } else {
        f32::from_bits(((exp + 120) << 23) | (man << 20))
    };
    sign * magnitude
}

pub(crate) fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn bf16_le(b: &[u8]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
}

fn f16_le(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

fn f32_bytes<'a>(values: impl Iterator<Item = f32>) -> Cow<'a, [u8]> {
    Cow::Owned(values.flat_map(f32::to_le_bytes).collect())
}

fn bf16_bytes<'a>(values: impl Iterator<Item = f32>) -> Cow<'a, [u8]> {
    Cow::Owned(
        values
            .flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exp 7, man 0
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert!(e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn bf16_passes_through_borrowed() {
        let bytes = [0x80u8, 0x3f, 0x00, 0x40];
        let rows = Rows {
            dtype: Dtype::BF16,
            bytes: &bytes,
            cols: 2,
            first_row: 0,
        };
        let (dtype, data) = convert(rows, None, Want::Weight).expect("bf16 converts");
        assert_eq!(dtype, WeightDtype::BF16);
        assert!(matches!(data, Cow::Borrowed(_)));
    }

    #[test]
    fn f8_without_scale_is_refused() {
        let rows = Rows {
            dtype: Dtype::F8_E4M3,
            bytes: &[0x38],
            cols: 1,
            first_row: 0,
        };
        assert!(matches!(
            convert(rows, None, Want::Weight),
            Err(ConvertError::NeedsScale)
        ));
    }
}
