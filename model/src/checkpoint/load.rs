//! One stored tensor (or a run of rows of one slab of it) → a [`HostTensor`]: shape check
//! against the config, FP8 block-scale lookup, dtype conversion, zero-copy slicing.

use std::borrow::Cow;
use std::ops::Range;

use safetensors::Dtype;

use super::convert::{self, ConvertError, FP8_BLOCK, Rows, ScaleGrid, Want};
use super::store::{RawTensor, Store};
use super::{CheckpointError, HostTensor};

/// Which part of a stored tensor to load.
#[derive(Clone, Debug)]
pub(crate) enum Select {
    Whole,
    /// Rows `rows` of slab `slab` of a `[slabs, rows, cols]` tensor (one fused expert).
    SlabRows {
        slab: usize,
        rows: Range<usize>,
    },
}

/// A request: the name, the stored shapes we accept (the first is quoted in errors), the
/// shape handed out, the wanted dtype, and the part.
pub(crate) struct Request<'n> {
    pub name: &'n str,
    pub accept: &'n [&'n [usize]],
    pub out_shape: Vec<usize>,
    pub want: Want,
    pub select: Select,
}

impl<'n> Request<'n> {
    pub(crate) fn whole(name: &'n str, accept: &'n [&'n [usize]], out_shape: &[usize]) -> Self {
        Request {
            name,
            accept,
            out_shape: out_shape.to_vec(),
            want: Want::Weight,
            select: Select::Whole,
        }
    }
}

/// `[slabs, rows, cols]` view of a stored shape (1-D is one row; higher dims fold into slabs).
struct Geometry {
    slabs: usize,
    rows: usize,
    cols: usize,
    lead: Vec<usize>,
}

impl Geometry {
    fn of(shape: &[usize]) -> Geometry {
        match shape {
            [] => Geometry {
                slabs: 1,
                rows: 1,
                cols: 1,
                lead: vec![],
            },
            [n] => Geometry {
                slabs: 1,
                rows: 1,
                cols: *n,
                lead: vec![],
            },
            [lead @ .., r, c] => Geometry {
                slabs: lead.iter().product(),
                rows: *r,
                cols: *c,
                lead: lead.to_vec(),
            },
        }
    }

    fn scale_shape(&self, stored: &[usize]) -> Vec<usize> {
        let blocks = |n: usize| n.div_ceil(FP8_BLOCK);
        if stored.len() < 2 {
            return vec![blocks(self.cols)];
        }
        let mut s = self.lead.clone();
        s.extend([blocks(self.rows), blocks(self.cols)]);
        s
    }
}

pub(crate) fn load<'s>(
    store: &'s Store,
    req: Request<'_>,
) -> Result<HostTensor<'s>, CheckpointError> {
    let raw = store.get(req.name)?;
    if !req.accept.contains(&raw.shape) {
        return Err(shape_error(
            &raw,
            req.accept.first().copied().unwrap_or(&[]),
        ));
    }
    if !convert::is_supported(raw.dtype) {
        return Err(dtype_error(&raw));
    }
    let geo = Geometry::of(raw.shape);
    let elem = raw.dtype.bitsize() / 8;
    let row_bytes = geo.cols * elem;
    let scales = if raw.dtype == Dtype::F8_E4M3 {
        Some(scale_tensor(store, &raw, &geo)?)
    } else {
        None
    };

    let slab_bytes = geo.rows * row_bytes;
    let (slabs, rows, suffix) = match &req.select {
        Select::Whole => (0..geo.slabs, 0..geo.rows, String::new()),
        Select::SlabRows { slab, rows } => (
            *slab..*slab + 1,
            rows.clone(),
            format!("[{slab}][{}..{}]", rows.start, rows.end),
        ),
    };
    let expected = req.accept.first().copied().unwrap_or(&[]);
    // Rows `rows` of slabs `range`, contiguous in the file when the range is one slab or whole.
    let span = |range: Range<usize>| {
        let (first, last) = (range.start, range.end.saturating_sub(1));
        raw.bytes
            .get(
                first * slab_bytes + rows.start * row_bytes
                    ..last * slab_bytes + rows.end * row_bytes,
            )
            .ok_or_else(|| shape_error(&raw, expected))
    };
    let convert_span = |range: Range<usize>, grid: Option<&ScaleGrid>| {
        let rows = Rows {
            dtype: raw.dtype,
            bytes: span(range)?,
            cols: geo.cols,
            first_row: rows.start,
        };
        convert::convert(rows, grid, req.want).map_err(|e| conversion_error(&raw, e))
    };
    let (dtype, data) = match &scales {
        None => convert_span(slabs, None)?,
        // Each slab has its own scale grid, so F8 converts slab by slab.
        Some(scales) => {
            let mut dtype = myriad_kernels::WeightDtype::BF16;
            let mut out = Vec::new();
            for slab in slabs {
                let (d, bytes) = convert_span(slab..slab + 1, Some(&scales.for_slab(slab)))?;
                dtype = d;
                out.extend_from_slice(&bytes);
            }
            (dtype, Cow::Owned(out))
        }
    };
    Ok(HostTensor {
        name: format!("{}{suffix}", raw.name),
        dtype,
        shape: req.out_shape,
        data,
    })
}

/// The block scales of an F8 tensor, read once per request.
struct Scales {
    values: Vec<f32>,
    grid_rows: usize,
    grid_cols: usize,
}

impl Scales {
    fn for_slab(&self, slab: usize) -> ScaleGrid {
        let per = self.grid_rows * self.grid_cols;
        ScaleGrid {
            values: self
                .values
                .get(slab * per..(slab + 1) * per)
                .unwrap_or(&[])
                .to_vec(),
            cols: self.grid_cols,
        }
    }
}

fn scale_tensor(
    store: &Store,
    raw: &RawTensor<'_>,
    geo: &Geometry,
) -> Result<Scales, CheckpointError> {
    let scale_name = format!("{}_scale_inv", raw.name);
    if !store.contains(&scale_name) {
        return Err(CheckpointError::MissingScale {
            tensor: raw.name.to_string(),
            scale: scale_name,
            path: raw.path.to_path_buf(),
        });
    }
    let scale = store.get(&scale_name)?;
    let expected = geo.scale_shape(raw.shape);
    if scale.shape != expected.as_slice() {
        return Err(shape_error(&scale, &expected));
    }
    let values = match convert::read_f32s(scale.dtype, scale.bytes) {
        Some(v) => v,
        None => return Err(dtype_error(&scale)),
    };
    let grid_cols = geo.cols.div_ceil(FP8_BLOCK);
    let grid_rows = if raw.shape.len() < 2 {
        1
    } else {
        geo.rows.div_ceil(FP8_BLOCK)
    };
    Ok(Scales {
        values,
        grid_rows,
        grid_cols,
    })
}

fn shape_error(raw: &RawTensor<'_>, expected: &[usize]) -> CheckpointError {
    CheckpointError::Shape {
        tensor: raw.name.to_string(),
        path: raw.path.to_path_buf(),
        expected: expected.to_vec(),
        actual: raw.shape.to_vec(),
    }
}

fn dtype_error(raw: &RawTensor<'_>) -> CheckpointError {
    let hint = match raw.dtype {
        Dtype::F8_E5M2 | Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ | Dtype::F8_E8M0 => {
            " (the only FP8 format supported is F8_E4M3 with 128x128 block scales)"
        }
        _ => " (expected BF16, F32, F16 or F8_E4M3)",
    };
    CheckpointError::Dtype {
        tensor: raw.name.to_string(),
        path: raw.path.to_path_buf(),
        dtype: raw.dtype.to_string(),
        hint: hint.to_string(),
    }
}

fn conversion_error(raw: &RawTensor<'_>, e: ConvertError) -> CheckpointError {
    match e {
        ConvertError::Unsupported => dtype_error(raw),
        ConvertError::NeedsScale => CheckpointError::MissingScale {
            tensor: raw.name.to_string(),
            scale: format!("{}_scale_inv", raw.name),
            path: raw.path.to_path_buf(),
        },
    }
}
