//! `myriad bench transfer`: how fast a sequence's state moves from a prefill node to a decode
//! node: the real sender and receiver (`cli/src/disagg/`) over QUIC on loopback with mutual
//! TLS (certificates generated for the run), frames checked and assembled as in serving,
//! against a memcpy of the same bytes, interleaved (transfer, copy, transfer, copy, …) and
//! reported as medians with their ranges.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use myriad_transport::{TlsConfig, generate_pki};
use myriad_wire::seq_state::{
    KvBlock, KvDtype, LayerImage, LayerShape, STATE_FORMAT_VERSION, SequenceStateImage, StateBegin,
};
use serde_json::json;

use crate::disagg::receiver::StateReceiver;
use crate::disagg::sender::StateSender;

#[derive(Args, Debug)]
pub struct TransferArgs {
    /// Megabytes of state per transfer.
    #[arg(long, default_value_t = 256)]
    pub mb: usize,
    /// Transfers (and as many copies) to time.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A state of one attention layer (2 KV heads of 128, f32, blocks of 32 tokens) holding
/// `bytes` of KV: what a long prompt's hand-off mostly is.
fn synthetic(bytes: usize) -> SequenceStateImage {
    let (kv_heads, head_dim, block_tokens) = (2u32, 128u32, 32u32);
    let per_token = 2 * kv_heads as usize * head_dim as usize * 4;
    let blocks = (bytes / per_token).div_ceil(block_tokens as usize).max(1);
    let position = blocks * block_tokens as usize;
    let block_bytes = block_tokens as usize * per_token;
    let layers = vec![LayerImage::Attention {
        blocks: (0..blocks)
            .map(|b| KvBlock {
                key_scale: 1.0,
                value_scale: 1.0,
                data: (0..block_bytes)
                    .map(|i| ((i * 31 + b * 7) % 251) as u8)
                    .collect(),
            })
            .collect(),
    }];
    SequenceStateImage {
        begin: StateBegin {
            transfer_id: 0,
            state_version: STATE_FORMAT_VERSION,
            model_fingerprint: 1,
            position: position as u64,
            tokens: (0..position as u32).map(|t| t % 1000).collect(),
            rng: [1, 2, 3, 4],
            generated: 0,
            layers: vec![LayerShape::Attention {
                kv_heads,
                head_dim,
                block_tokens,
                dtype: KvDtype::F32,
            }],
        },
        layers,
    }
}

fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn run(a: &TransferArgs) -> Result<()> {
    let image = synthetic(a.mb << 20);
    let bytes: usize = match &image.layers[0] {
        LayerImage::Attention { blocks } => blocks.iter().map(|b| b.data.len()).sum(),
        LayerImage::DeltaNet { .. } => 0,
    };
    let position = image.begin.position as usize;
    let dir = std::env::temp_dir().join(format!("myriad-bench-transfer-{}", std::process::id()));
    generate_pki(&dir, &["prefill", "decode"], "myriad-node").context("generating certificates")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let (mut transfer_gb_s, mut copy_gb_s) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let receiver = StateReceiver::bind(
            "127.0.0.1:0".parse()?,
            &TlsConfig::files(&dir, "decode", "myriad-node"),
            1,
            Arc::new(|_: &StateBegin| Ok(())),
        )?;
        let addr = receiver.local_addr().to_string();
        let sender = StateSender::new(TlsConfig::files(&dir, "prefill", "myriad-node"));
        // One untimed transfer: the connection's handshake is not part of a hand-off's cost
        // once nodes have talked.
        for round in 0..=a.repeats {
            let id = round as u64 + 1;
            let mut expected = receiver.expect(id, position);
            let t0 = Instant::now();
            let (sent, arrived) =
                tokio::join!(sender.send(&addr, None, &image, id), expected.arrival());
            let seconds = t0.elapsed().as_secs_f64();
            sent.map_err(anyhow::Error::msg)?;
            let got = arrived.map_err(anyhow::Error::msg)?;
            anyhow::ensure!(got.layers == image.layers, "the state arrived changed");
            drop(got);
            let t1 = Instant::now();
            let copies: Vec<Vec<u8>> = match &image.layers[0] {
                LayerImage::Attention { blocks } => blocks.iter().map(|b| b.data.clone()).collect(),
                LayerImage::DeltaNet { .. } => Vec::new(),
            };
            let copy_s = t1.elapsed().as_secs_f64();
            std::hint::black_box(&copies);
            if round > 0 {
                transfer_gb_s.push(bytes as f64 / seconds / 1e9);
                copy_gb_s.push(bytes as f64 / copy_s / 1e9);
            }
        }
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    let (t, t_lo, t_hi) = median_range(transfer_gb_s);
    let (c, c_lo, c_hi) = median_range(copy_gb_s);
    if a.json {
        println!(
            "{}",
            json!({"bench": "transfer", "bytes": bytes, "tokens": position,
                "transfer_gb_s": {"median": t, "min": t_lo, "max": t_hi},
                "memcpy_gb_s": {"median": c, "min": c_lo, "max": c_hi}})
        );
    } else {
        eprintln!(
            "state transfer of {:.0} MB ({position} tokens) over QUIC with mutual TLS on \
             loopback: {t:.2} GB/s (median of {}, {t_lo:.2}-{t_hi:.2}); memcpy of the same \
             bytes {c:.2} GB/s ({c_lo:.2}-{c_hi:.2}): {:.0}%",
            bytes as f64 / 1e6,
            a.repeats,
            100.0 * t / c
        );
    }
    Ok(())
}
