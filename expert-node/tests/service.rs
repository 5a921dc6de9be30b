//! The expert node's request handler: the handshake, and every request it must refuse with an
//! error reply that names the problem (the node keeps serving afterwards).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use myriad_expert::{ExpertService, ExpertShard, NodeIdentity};
use myriad_kernels::Routes;
use myriad_kernels::cpu::CpuBackend;
use myriad_model::{Checkpoint, ExpertSet, ModelConfig};
use myriad_transport::{Frame, Handler};
use myriad_wire::{
    ErrorCode, ErrorReply, ExpertRequest, ExpertResponse, FrameKind, Hello, HelloAck, Limits,
    Message, TensorDtype, WireTensor,
};

fn service() -> (ExpertService<CpuBackend>, ModelConfig) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/qwen3_5_moe-tiny");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, &config).unwrap();
    let set = ExpertSet::parse("0-31", config.num_experts).unwrap();
    let shard =
        Arc::new(ExpertShard::load(Arc::new(CpuBackend::new(1)), &config, &ckpt, &set).unwrap());
    let id = NodeIdentity {
        name: "n0".into(),
        model_fingerprint: config.fingerprint(),
        num_layers: config.num_layers,
        num_experts: config.num_experts,
        hidden: config.hidden_size,
    };
    (ExpertService::new(shard, id, Limits::default()), config)
}

fn request(layer: u32, cols: usize, experts: &[u32]) -> Frame {
    let mut routes = Routes::new();
    routes.push_row(experts, &vec![1.0 / experts.len() as f32; experts.len()]);
    let hidden = WireTensor::from_f32(1, cols as u32, &vec![0.1; cols], TensorDtype::F32);
    Frame::new(
        FrameKind::ExpertRequest,
        ExpertRequest {
            id: 7,
            layer,
            hidden,
            routes,
        }
        .encode(),
    )
}

fn refusal(reply: &Frame) -> ErrorReply {
    assert_eq!(reply.kind, FrameKind::Error, "expected an error reply");
    ErrorReply::decode(&reply.payload, &Limits::default()).unwrap()
}

#[tokio::test]
async fn handshake_serving_and_refusals() {
    let (svc, config) = service();
    let h = config.hidden_size;
    // Handshake: the node's identity and held experts; a wrong model is refused.
    let hello = Hello {
        client: "test".into(),
        model_fingerprint: config.fingerprint(),
    };
    let ack = svc
        .handle(Frame::new(FrameKind::Hello, hello.encode()))
        .await;
    assert_eq!(ack.kind, FrameKind::HelloAck);
    let ack = HelloAck::decode(&ack.payload, &Limits::default()).unwrap();
    assert_eq!((ack.node.as_str(), ack.held.len()), ("n0", 32));
    let wrong = Hello {
        client: "test".into(),
        model_fingerprint: 1,
    };
    assert_eq!(
        refusal(
            &svc.handle(Frame::new(FrameKind::Hello, wrong.encode()))
                .await
        )
        .code,
        ErrorCode::ModelMismatch
    );

    // A good request is served.
    let ok = svc.handle(request(0, h, &[3, 5])).await;
    assert_eq!(ok.kind, FrameKind::ExpertResponse);
    let resp = ExpertResponse::decode(&ok.payload, &Limits::default()).unwrap();
    assert_eq!(
        (
            resp.id,
            resp.output.rows as usize,
            resp.output.cols as usize
        ),
        (7, 1, h)
    );

    // Refusals name what was wrong.
    let e = refusal(&svc.handle(request(99, h, &[3])).await);
    assert_eq!(e.code, ErrorCode::UnknownLayer);
    assert!(e.message.contains("layer 99"), "{}", e.message);
    let e = refusal(&svc.handle(request(0, h, &[3, 40])).await);
    assert_eq!(e.code, ErrorCode::ExpertNotHeld);
    assert!(
        e.message.contains("expert 40") && e.message.contains("0-31"),
        "{}",
        e.message
    );
    let e = refusal(&svc.handle(request(0, h + 1, &[3])).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    let e = refusal(
        &svc.handle(Frame::new(FrameKind::ExpertRequest, vec![1, 2, 3]))
            .await,
    );
    assert_eq!(e.code, ErrorCode::BadFrame);
    let e = refusal(
        &svc.handle(Frame::new(FrameKind::ExpertResponse, Vec::new()))
            .await,
    );
    assert_eq!(e.code, ErrorCode::BadRequest);

    // And it keeps serving.
    assert_eq!(
        svc.handle(request(1, h, &[0])).await.kind,
        FrameKind::ExpertResponse
    );
}
