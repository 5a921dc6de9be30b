//! Values of one synthetic tensor, generated in fixed-size chunks in parallel (rayon) and
//! streamed out. Each chunk has its own generator seeded from (model seed, tensor name, chunk
//! index), so the bytes do not depend on the thread count or on the write order.

use myriad_kernels::WeightDtype;
use rayon::prelude::*;

use super::SynthError;
use super::plan::{Init, Planned};
use super::rng::{Rng, chunk_seed, tensor_seed};
use super::writer::ShardWriter;

/// Elements per independently seeded chunk (part of the output's definition: do not change).
const CHUNK: usize = 1 << 16;
/// Chunks generated per batch: bounds memory to a few MiB per tensor in flight.
const BATCH: usize = 64;

pub(crate) fn write_tensor(
    t: &Planned,
    seed: u64,
    out: &mut ShardWriter,
) -> Result<(), SynthError> {
    let base = tensor_seed(seed, &t.name);
    if t.init == Init::ALog {
        return out.write(&encode_f32(&a_log(t.elements(), base)));
    }
    let total = t.elements();
    let elem = t.dtype.size();
    let mut buf = vec![0u8; total.min(CHUNK * BATCH) * elem];
    let mut start = 0;
    while start < total {
        let n = (total - start).min(CHUNK * BATCH);
        let first_chunk = start / CHUNK;
        buf[..n * elem]
            .par_chunks_mut(CHUNK * elem)
            .enumerate()
            .for_each(|(i, bytes)| {
                let mut rng = Rng::new(chunk_seed(base, (first_chunk + i) as u64));
                fill(bytes, t.init, t.dtype, &mut rng);
            });
        out.write(&buf[..n * elem])?;
        start += n;
    }
    Ok(())
}

fn fill(bytes: &mut [u8], init: Init, dtype: WeightDtype, rng: &mut Rng) {
    let mut draw = || match init {
        Init::Normal { std } => rng.normal() * std,
        Init::Uniform { lo, hi } => rng.uniform(lo, hi),
        Init::ALog => 0.0,
    };
    match dtype {
        WeightDtype::BF16 => {
            for b in bytes.chunks_exact_mut(2) {
                b.copy_from_slice(&half::bf16::from_f32(draw() as f32).to_bits().to_le_bytes());
            }
        }
        WeightDtype::F32 => {
            // Still bf16-representable, so an F32 model holds the same values as a BF16 one.
            for b in bytes.chunks_exact_mut(4) {
                b.copy_from_slice(&half::bf16::from_f32(draw() as f32).to_f32().to_le_bytes());
            }
        }
    }
}

/// Decay rates spread over log(0.005) .. log(4), shuffled, with a little jitter: some heads
/// forget within a few tokens, others remember across several 64-token chunks.
fn a_log(n: usize, seed: u64) -> Vec<f64> {
    let (lo, hi) = (0.005f64.ln(), 4f64.ln());
    let mut grid: Vec<f64> = (0..n)
        .map(|i| {
            if n > 1 {
                lo + (hi - lo) * i as f64 / (n - 1) as f64
            } else {
                lo
            }
        })
        .collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        grid.swap(i, rng.below(i + 1));
    }
    grid.iter().map(|g| g + rng.uniform(-0.1, 0.1)).collect()
}

/// A_log keeps full f32 precision (it is exponentiated), so it is not rounded to bf16.
fn encode_f32(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect()
}
