//! Ceilings measured on this machine, in the same run as a benchmark: memory read bandwidth
//! (the decode roofline) and the matmul peak of our own GEMM (the prefill ceiling).

use std::time::Instant;

use crate::cpu::arena::{Region, WeightArena};
use crate::cpu::gemm::Precision;
use crate::cpu::isa::{Isa, multiversion};
use crate::cpu::matmul::matmul;
use crate::cpu::packed::PackedMatrix;
use crate::cpu::pool::Pool;
use crate::cpu::vmath;
use crate::{HostMatrix, WeightDtype};

multiversion! {
    fn sum_block(x: &[f32]) -> f32 {
        vmath::sum(x)
    }
}

/// Measures read bandwidth over one buffer allocated once (in the same kind of memory weights
/// live in: huge pages where available, so the ceiling is measured on equal terms).
pub struct ReadProbe {
    buf: Region,
}

impl ReadProbe {
    /// A probe over `bytes` of memory (at least 256 KiB).
    pub fn new(bytes: usize) -> ReadProbe {
        let n = (bytes / 4).max(1 << 16);
        let mut buf = Region::standalone(n * 4);
        for (i, v) in buf.as_mut_slice::<f32>().iter_mut().enumerate() {
            *v = (i % 7) as f32;
        }
        ReadProbe { buf }
    }

    /// GB/s (10⁹ bytes/s) of every thread summing its own part of the first `bytes` of the
    /// buffer, best of `repeats` passes.
    pub fn gb_s(&self, pool: &Pool, isa: Isa, bytes: usize, repeats: usize) -> f64 {
        let all = self.buf.as_slice::<f32>();
        let n = (bytes / 4).clamp(1, all.len());
        let buf = &all[..n];
        let tasks = pool.threads() * 4;
        let per = n.div_ceil(tasks);
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) {
            let t0 = Instant::now();
            let sink = std::sync::atomic::AtomicU32::new(0);
            pool.for_each(tasks, |t| {
                let lo = (t * per).min(n);
                let hi = ((t + 1) * per).min(n);
                let s = sum_block(isa, &buf[lo..hi]);
                sink.fetch_add(s.to_bits() & 1, std::sync::atomic::Ordering::Relaxed);
            });
            std::hint::black_box(sink.into_inner());
            best = best.min(t0.elapsed().as_secs_f64());
        }
        (n * 4) as f64 / best / 1e9
    }
}

/// GFLOP/s of `x[m, k] · Wᵀ` with `W [n, k]` in `dtype`, best of `repeats`.
pub fn matmul_gflops(
    pool: &Pool,
    isa: Isa,
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dtype: WeightDtype,
    repeats: usize,
) -> f64 {
    let es = dtype.size();
    let bytes: Vec<u8> = (0..n * k)
        .flat_map(|i| {
            let v = ((i * 2_654_435_761) % 1000) as f32 / 1000.0 - 0.5;
            match dtype {
                WeightDtype::F32 => v.to_le_bytes().to_vec(),
                WeightDtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            }
        })
        .collect();
    debug_assert_eq!(bytes.len(), n * k * es);
    let Ok(host) = HostMatrix::new(dtype, n, k, &bytes) else {
        return 0.0;
    };
    let w = PackedMatrix::from_host(&host, &WeightArena::new());
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32) * 0.01).collect();
    let mut out = vec![0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        matmul(pool, isa, precision, m, &x, k, w.view(), &mut out, n, false);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    2.0 * (m * n * k) as f64 / best / 1e9
}
