//! The CPU backend: f32 activations in `Vec`s, weights packed into panels (bf16 or f32),
//! kernels specialised per instruction set, work split over a fixed pool of threads.

pub mod arena;
mod attention;
mod delta_rule;
mod deltanet;
pub mod gemm;
pub mod isa;
mod kv_cache;
pub mod matmul;
mod moe;
mod ops;
pub mod packed;
pub mod pool;
mod rope;
#[cfg(target_arch = "x86_64")]
mod ukernel_avx2;
#[cfg(target_arch = "x86_64")]
mod ukernel_avx512;
mod ukernel_portable;
pub mod vmath;

pub use deltanet::CpuDeltaState;
pub use gemm::{Precision, has_bf16_dot};
pub use isa::Isa;
pub use kv_cache::{BlockCounter, CpuKvCache};
pub use packed::PackedMatrix;
pub use pool::Pool;

use std::sync::Arc;

use half::bf16;

use crate::{
    AttentionDims, AttentionLayer, Backend, DeltaNetDims, DeltaNetLayer, DeltaStateHost,
    ExpertMatrices, HostMatrix, KernelError, KvBlocksHost, KvCacheHost, KvCacheSpec, MatrixUse,
    Routes, SeqSpan, WeightDtype,
};

/// A dense row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "tensor data length");
        CpuTensor { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A prepared weight: packed panels for linear layers, plain rows for lookup tables.
pub enum CpuMatrix {
    Packed(PackedMatrix),
    Rows {
        dtype: WeightDtype,
        rows: usize,
        cols: usize,
        data: arena::Region,
    },
}

impl CpuMatrix {
    fn packed(&self) -> &PackedMatrix {
        match self {
            CpuMatrix::Packed(p) => p,
            CpuMatrix::Rows { .. } => panic!("a lookup table was used as a linear weight"),
        }
    }
}

/// The CPU compute backend.
pub struct CpuBackend {
    pool: Pool,
    /// Huge-page backed memory for prepared weights.
    arena: arena::WeightArena,
    isa: Isa,
    precision: Precision,
    /// KV blocks alive in this backend's caches.
    kv_blocks: BlockCounter,
}

impl CpuBackend {
    /// A backend with `threads` workers (0: one per core) using the best instruction set.
    pub fn new(threads: usize) -> Self {
        CpuBackend {
            pool: Pool::new(threads),
            arena: arena::WeightArena::new(),
            isa: Isa::detect(),
            precision: Precision::F32,
            kv_blocks: BlockCounter::default(),
        }
    }

    /// Like [`CpuBackend::new`] but limited to `isa` (clamped to what the CPU supports).
    pub fn with_isa(threads: usize, isa: Isa) -> Self {
        CpuBackend {
            isa: isa.min(Isa::detect()),
            ..CpuBackend::new(threads)
        }
    }

    /// Rounds weight-matmul inputs to `precision` (default f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = CpuMatrix;
    type DeltaState = CpuDeltaState;
    type KvCache = CpuKvCache;

    /// Ordinary pages for what the thread allocates: a huge-page fault may compact memory,
    /// migrating the serving threads' pages under them and stalling their steps.
    fn prepare_background_thread(&self) {
        arena::use_small_pages_on_this_thread();
    }

    fn name(&self) -> String {
        format!(
            "cpu ({}, {} threads, {} matmul inputs)",
            self.isa.name(),
            self.pool.threads(),
            self.precision.name()
        )
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor::new(rows, cols, vec![0.0; rows * cols])
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CpuTensor, KernelError> {
        if data.len() != rows * cols {
            return Err(KernelError::TensorLen {
                rows,
                cols,
                expected: rows * cols,
                actual: data.len(),
            });
        }
        Ok(CpuTensor::new(rows, cols, data.to_vec()))
    }

    fn download(&self, t: &CpuTensor) -> Vec<f32> {
        t.data.clone()
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        CpuTensor::new(rows.len(), x.cols, data)
    }

    fn matrix(&self, host: HostMatrix<'_>, usage: MatrixUse) -> Result<CpuMatrix, KernelError> {
        let host = HostMatrix::new(host.dtype, host.rows, host.cols, host.data)?;
        Ok(match usage {
            MatrixUse::Linear => CpuMatrix::Packed(PackedMatrix::from_host(&host, &self.arena)),
            MatrixUse::Lookup => {
                let mut data = self.arena.alloc(host.data.len());
                data.as_mut_slice::<u8>().copy_from_slice(host.data);
                CpuMatrix::Rows {
                    dtype: host.dtype,
                    rows: host.rows,
                    cols: host.cols,
                    data,
                }
            }
        })
    }

    fn matrix_shape(&self, m: &CpuMatrix) -> (usize, usize) {
        match m {
            CpuMatrix::Packed(p) => (p.n, p.k),
            CpuMatrix::Rows { rows, cols, .. } => (*rows, *cols),
        }
    }

    fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
        match m {
            CpuMatrix::Packed(p) => p.n * p.k * p.dtype.size(),
            CpuMatrix::Rows { data, .. } => data.len(),
        }
    }

    fn embed(
        &self,
        table: &CpuMatrix,
        ids: &[u32],
        out: &mut CpuTensor,
    ) -> Result<(), KernelError> {
        let CpuMatrix::Rows {
            dtype,
            rows,
            cols,
            data,
        } = table
        else {
            panic!("embedding table must be prepared with MatrixUse::Lookup");
        };
        assert_eq!(
            (out.rows, out.cols),
            (ids.len(), *cols),
            "embedding output shape"
        );
        for (i, &id) in ids.iter().enumerate() {
            let r = id as usize;
            if r >= *rows {
                return Err(KernelError::TokenOutOfRange { id, vocab: *rows });
            }
            let dst = &mut out.data[i * cols..(i + 1) * cols];
            match dtype {
                WeightDtype::F32 => {
                    dst.copy_from_slice(&data.as_slice::<f32>()[r * cols..(r + 1) * cols])
                }
                WeightDtype::BF16 => {
                    for (d, v) in dst
                        .iter_mut()
                        .zip(&data.as_slice::<u16>()[r * cols..(r + 1) * cols])
                    {
                        *d = bf16::from_bits(*v).to_f32();
                    }
                }
            }
        }
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuMatrix, out: &mut CpuTensor) {
        let p = w.packed();
        assert_eq!(
            x.cols, p.k,
            "matmul: x has {} columns, weight expects {}",
            x.cols, p.k
        );
        assert_eq!((out.rows, out.cols), (x.rows, p.n), "matmul output shape");
        matmul::matmul(
            &self.pool,
            self.isa,
            self.precision,
            x.rows,
            &x.data,
            x.cols,
            p.view(),
            &mut out.data,
            p.n,
            false,
        );
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32, out: &mut CpuTensor) {
        assert_eq!(weight.data.len(), x.cols, "norm weight length");
        assert_eq!((out.rows, out.cols), (x.rows, x.cols), "norm output shape");
        ops::rms_norm(
            &self.pool,
            self.isa,
            &x.data,
            &weight.data,
            eps,
            &mut out.data,
        );
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuTensor,
        eps: f32,
        out: &mut CpuTensor,
    ) {
        assert_eq!(
            (residual.rows, residual.cols),
            (delta.rows, delta.cols),
            "residual shape"
        );
        assert_eq!(
            (out.rows, out.cols),
            (delta.rows, delta.cols),
            "norm output shape"
        );
        ops::add_rms_norm(
            &self.pool,
            self.isa,
            &mut residual.data,
            &delta.data,
            &weight.data,
            eps,
            &mut out.data,
        );
    }

    fn add(&self, acc: &mut CpuTensor, x: &CpuTensor) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols), "add shape");
        ops::add_slices(self.isa, &mut acc.data, &x.data);
    }

    fn swiglu(&self, gate_up: &CpuTensor, out: &mut CpuTensor) {
        assert!(
            gate_up.cols >= 2 * out.cols && gate_up.rows == out.rows,
            "swiglu shapes"
        );
        ops::swiglu(
            &self.pool,
            self.isa,
            &gate_up.data,
            gate_up.cols,
            out.cols,
            &mut out.data,
        );
    }

    fn add_sigmoid_gated(
        &self,
        acc: &mut CpuTensor,
        x: &CpuTensor,
        gate: &CpuTensor,
        gate_col: usize,
    ) {
        assert_eq!((acc.rows, acc.cols), (x.rows, x.cols), "gated add shape");
        assert!(gate.rows == x.rows && gate_col < gate.cols, "gate column");
        ops::add_sigmoid_gated(
            &mut acc.data,
            &x.data,
            x.cols,
            &gate.data,
            gate.cols,
            gate_col,
        );
    }

    fn new_delta_state(&self, dims: &DeltaNetDims) -> CpuDeltaState {
        CpuDeltaState::new(dims)
    }

    fn new_kv_cache(&self, dims: &AttentionDims, spec: &KvCacheSpec) -> CpuKvCache {
        CpuKvCache::new(dims, spec, self.kv_blocks.clone())
    }

    fn kv_blocks_live(&self) -> usize {
        self.kv_blocks.get()
    }

    fn gated_deltanet(
        &self,
        layer: &DeltaNetLayer<Self>,
        proj: &CpuTensor,
        spans: &[SeqSpan],
        states: &mut [&mut CpuDeltaState],
        out: &mut CpuTensor,
    ) {
        let d = layer.dims;
        assert_eq!(proj.cols, d.proj_dim(), "DeltaNet projection width");
        assert_eq!(
            (out.rows, out.cols),
            (proj.rows, d.value_dim()),
            "DeltaNet output shape"
        );
        assert_eq!(
            layer.conv_weight.data.len(),
            d.conv_kernel * d.conv_dim(),
            "conv taps"
        );
        let args = deltanet::DeltaNetArgs {
            dims: d,
            conv_weight: &layer.conv_weight.data,
            a_log: &layer.a_log.data,
            dt_bias: &layer.dt_bias.data,
            norm_weight: &layer.norm_weight.data,
        };
        deltanet::gated_deltanet(
            &self.pool,
            self.isa,
            &args,
            &proj.data,
            spans,
            states,
            &mut out.data,
        );
    }

    fn gated_attention(
        &self,
        layer: &AttentionLayer<Self>,
        proj: &CpuTensor,
        spans: &[SeqSpan],
        caches: &mut [&mut CpuKvCache],
        out: &mut CpuTensor,
    ) {
        let d = layer.dims;
        assert_eq!(proj.cols, d.proj_dim(), "attention projection width");
        assert_eq!(
            (out.rows, out.cols),
            (proj.rows, d.out_dim()),
            "attention output shape"
        );
        let args = attention::AttentionArgs {
            dims: d,
            q_norm: &layer.q_norm.data,
            k_norm: &layer.k_norm.data,
            precision: self.precision,
        };
        attention::gated_attention(
            &self.pool,
            self.isa,
            &args,
            &proj.data,
            spans,
            caches,
            &mut out.data,
        );
    }

    fn route(&self, logits: &CpuTensor, k: usize, renormalize: bool) -> Routes {
        moe::route(&logits.data, logits.cols, k, renormalize)
    }

    fn moe_experts(
        &self,
        x: &CpuTensor,
        routes: &Routes,
        experts: &[Option<Arc<ExpertMatrices<Self>>>],
        out: &mut CpuTensor,
    ) -> Result<(), KernelError> {
        assert_eq!(
            (out.rows, out.cols),
            (x.rows, x.cols),
            "expert output shape"
        );
        let lookup = |e: u32| {
            experts
                .get(e as usize)
                .and_then(|m| m.as_ref())
                .map(|m| moe::CpuExpert {
                    gate_up: m.gate_up.packed(),
                    down: m.down.packed(),
                })
        };
        moe::experts(
            &self.pool,
            self.isa,
            self.precision,
            &x.data,
            x.cols,
            routes,
            &lookup,
            &mut out.data,
        )
    }

    fn delta_state_to_host(&self, s: &CpuDeltaState) -> DeltaStateHost {
        s.to_host()
    }

    fn delta_state_from_host(
        &self,
        dims: &DeltaNetDims,
        host: &DeltaStateHost,
    ) -> Result<CpuDeltaState, KernelError> {
        CpuDeltaState::from_host(dims, host)
    }

    fn kv_cache_to_host(&self, c: &CpuKvCache) -> KvCacheHost {
        c.to_host()
    }

    fn kv_cache_from_host(
        &self,
        dims: &AttentionDims,
        spec: &KvCacheSpec,
        host: &KvCacheHost,
    ) -> Result<CpuKvCache, KernelError> {
        let row = dims.num_kv_heads * dims.head_dim;
        if host.keys.len() != host.len * row || host.values.len() != host.len * row {
            return Err(KernelError::StateShape(format!(
                "KV cache of {} tokens needs {} keys and values each, got {} and {}",
                host.len,
                host.len * row,
                host.keys.len(),
                host.values.len()
            )));
        }
        let mut c = CpuKvCache::new(dims, spec, self.kv_blocks.clone());
        c.append(&host.keys, &host.values);
        Ok(c)
    }

    fn kv_cache_export(&self, c: &CpuKvCache) -> KvBlocksHost {
        c.export_blocks()
    }

    fn kv_cache_import(
        &self,
        dims: &AttentionDims,
        host: &KvBlocksHost,
    ) -> Result<CpuKvCache, KernelError> {
        CpuKvCache::import_blocks(dims, host, self.kv_blocks.clone())
            .map_err(KernelError::StateShape)
    }

    fn kv_cache_blocks(&self, c: &CpuKvCache) -> usize {
        c.blocks()
    }

    fn kv_cache_len(&self, c: &CpuKvCache) -> usize {
        c.len
    }

    fn kv_cache_truncate(&self, c: &mut CpuKvCache, len: usize) {
        c.truncate(len);
    }
}
