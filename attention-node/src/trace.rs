//! Observation points inside the forward pass, for golden tests against the reference's
//! per-layer tensors, for benchmarks and for diagnostics. Tensors are copied off the device
//! only when the trace asks for them ([`Trace::wants_tensors`]); routing decisions are
//! already on the host and cost nothing to observe.

use myriad_kernels::Routes;

/// Receives intermediate values of one forward call as host f32 rows (`[rows, cols]`).
pub trait Trace {
    /// Whether the tensor hooks below should be called (each costs a device-to-host copy).
    fn wants_tensors(&self) -> bool {
        true
    }
    fn embeddings(&mut self, _x: &[f32]) {}
    /// Mixer output after `out_proj`/`o_proj`, before the residual add.
    fn mixer_out(&mut self, _layer: usize, _x: &[f32]) {}
    /// Router logits `[rows, experts]`.
    fn router_logits(&mut self, _layer: usize, _logits: &[f32]) {}
    /// The routing of every row (always called, no copy involved).
    fn routes(&mut self, _layer: usize, _routes: &Routes) {}
    /// `sigmoid(shared_expert_gate · x)` per row.
    fn shared_expert_gate(&mut self, _layer: usize, _gate: &[f32]) {}
    /// MoE output (routed + gated shared), before the residual add.
    fn moe_out(&mut self, _layer: usize, _x: &[f32]) {}
    /// Residual stream after the layer.
    fn layer_output(&mut self, _layer: usize, _x: &[f32]) {}
    /// Final-normed rows that feed `lm_head` (only the rows logits were asked for).
    fn final_norm(&mut self, _x: &[f32]) {}
}
