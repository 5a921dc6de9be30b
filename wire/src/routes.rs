//! Routing on the wire: which experts each row of a request goes to, with what weight.
//!
//! ```text
//! rows u32 (= the hidden tensor's rows)
//! rows × { count u16 | count × (expert u32, weight f32) }
//! ```
//!
//! Pairs keep their order: an expert node sums a row's expert outputs in exactly this order,
//! which is what makes the combined result independent of how rows are split across nodes.

use crate::route_table::Routes;

use super::WireError;
use super::codec::{Put, Reader};
use super::limits::Limits;

/// Bytes of one (expert, weight) pair.
const PAIR_BYTES: u64 = 8;
/// Bytes of a row's pair count.
const COUNT_BYTES: u64 = 2;

/// The field names a route's decode errors use.
#[derive(Debug)]
pub(crate) struct RouteFields {
    pub rows: &'static str,
    pub count: &'static str,
    pub expert: &'static str,
    pub weight: &'static str,
}

/// Appends `routes`. A row with more than 65535 pairs cannot be encoded (its count
/// saturates, so the peer rejects the payload instead of misreading it).
pub(crate) fn encode_routes(routes: &Routes, out: &mut Vec<u8>) {
    out.reserve(4 + routes.rows() * COUNT_BYTES as usize + routes.pairs() * PAIR_BYTES as usize);
    out.put_u32(u32::try_from(routes.rows()).unwrap_or(u32::MAX));
    for i in 0..routes.rows() {
        let (experts, weights) = routes.row(i);
        out.put_u16(u16::try_from(experts.len()).unwrap_or(u16::MAX));
        for (e, w) in experts.iter().zip(weights) {
            out.put_u32(*e);
            out.put_f32(*w);
        }
    }
}

/// Decodes routes for a tensor of `rows` rows: the row count must match, every count is
/// bounded by `max_experts_per_row` and the bytes left, every expert id by `max_expert_id`,
/// and every weight must be finite.
pub(crate) fn decode_routes(
    r: &mut Reader<'_>,
    names: &RouteFields,
    rows: u32,
    limits: &Limits,
) -> Result<Routes, WireError> {
    let n = r.u32(names.rows)?;
    if n != rows {
        return Err(WireError::Malformed {
            what: names.rows,
            detail: format!("routes for {n} rows, but the tensor has {rows}"),
        });
    }
    // Every row carries at least its count, so this bounds the offsets allocation by the payload.
    r.require(u64::from(n) * COUNT_BYTES, names.count)?;
    let mut routes = Routes::with_capacity(n as usize, 0);
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..n {
        let count = r.u16(names.count)?;
        if u32::from(count) > limits.max_experts_per_row {
            return Err(WireError::OverLimit {
                what: names.count,
                value: count.into(),
                max: limits.max_experts_per_row.into(),
            });
        }
        r.require(u64::from(count) * PAIR_BYTES, names.expert)?;
        experts.clear();
        weights.clear();
        for _ in 0..count {
            let e = r.u32_max(names.expert, limits.max_expert_id)?;
            let w = r.f32(names.weight)?;
            if !w.is_finite() {
                return Err(WireError::Malformed {
                    what: names.weight,
                    detail: format!("{w} for expert {e} is not finite"),
                });
            }
            experts.push(e);
            weights.push(w);
        }
        routes.push_row(&experts, &weights);
    }
    Ok(routes)
}
