//! The data-plane messages: one [`ExpertRequest`] per destination node per layer step, and its
//! [`ExpertResponse`].
//!
//! ```text
//! ExpertRequest  id u64 | layer u32 (< max_layers) | hidden tensor | routes (rows = hidden.rows)
//! ExpertResponse id u64 | output tensor
//! ```
//!
//! (Tensor layout in [`super::tensor`], routes in [`super::routes`].)

use crate::route_table::Routes;

use super::WireError;
use super::codec::Put;
use super::frame::FrameKind;
use super::limits::Limits;
use super::messages::{Message, reader};
use super::routes::{RouteFields, decode_routes, encode_routes};
use super::tensor::{WireTensor, tensor_fields};

/// Run `hidden`'s rows through routed experts of `layer`: row `i` goes to the experts of
/// `routes.row(i)` and comes back as their weighted sum, taken in route order.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertRequest {
    /// Chosen by the caller; echoed by the response (or error) so replies can be matched.
    pub id: u64,
    pub layer: u32,
    /// `[rows, hidden_size]`.
    pub hidden: WireTensor,
    /// `routes.rows() == hidden.rows`.
    pub routes: Routes,
}

/// The routed output of an [`ExpertRequest`]: `[rows, hidden_size]` weighted sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertResponse {
    pub id: u64,
    pub output: WireTensor,
}

const REQUEST_ROUTES: RouteFields = RouteFields {
    rows: "ExpertRequest.routes.rows",
    count: "ExpertRequest.routes.count",
    expert: "ExpertRequest.routes.expert",
    weight: "ExpertRequest.routes.weight",
};

impl Message for ExpertRequest {
    const KIND: FrameKind = FrameKind::ExpertRequest;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.id);
        out.put_u32(self.layer);
        self.hidden.encode_into(out);
        encode_routes(&self.routes, out);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let id = r.u64("ExpertRequest.id")?;
        let layer = r.u32("ExpertRequest.layer")?;
        if layer >= limits.max_layers {
            return Err(WireError::OverLimit {
                what: "ExpertRequest.layer",
                value: layer.into(),
                max: limits.max_layers.saturating_sub(1).into(),
            });
        }
        let hidden = WireTensor::decode(&mut r, &tensor_fields!("ExpertRequest.hidden"), limits)?;
        let routes = decode_routes(&mut r, &REQUEST_ROUTES, hidden.rows, limits)?;
        r.finish("ExpertRequest")?;
        Ok(ExpertRequest {
            id,
            layer,
            hidden,
            routes,
        })
    }
}

impl Message for ExpertResponse {
    const KIND: FrameKind = FrameKind::ExpertResponse;

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.id);
        self.output.encode_into(out);
    }

    fn decode(payload: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = reader(payload, limits)?;
        let id = r.u64("ExpertResponse.id")?;
        let output = WireTensor::decode(&mut r, &tensor_fields!("ExpertResponse.output"), limits)?;
        r.finish("ExpertResponse")?;
        Ok(ExpertResponse { id, output })
    }
}
