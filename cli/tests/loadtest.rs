//! `myriad loadtest` against a real `myriad serve` (the tiny fixture model, one kernel thread):
//! concurrent streams, a single-stream baseline and a 300-token long prompt, end to end through
//! the real HTTP server, read back as the JSON report.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

mod common;

/// Kills the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn loadtest_drives_a_real_server_end_to_end() {
    let dir = common::fixture("qwen3_5_moe-tiny");
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_myriad"))
            .args(["serve", "--port", "0", "--threads", "1", "--model"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("myriad serve said {line:?}"))
        .to_string();

    let args = format!(
        "loadtest --url {url} --concurrency 4 --requests 8 --max-tokens 8 --prompt-len 16 \
         --seed 7 --long-prompt-tokens 300 --long-prompt-after-s 0 --single-stream-baseline \
         --timeout-s 300 --output json"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(args.split_whitespace())
        .env_remove("MYRIAD_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "myriad loadtest failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let r: Value = serde_json::from_str(&stdout).unwrap();

    assert_eq!(r["config"]["model"], "qwen3_5_moe-tiny", "from /v1/models");
    assert_eq!(r["requests"]["ok"], 8);
    assert_eq!(r["requests"]["failed"], 0);
    assert_eq!(r["requests"]["not_started"], 0);
    assert_eq!(r["requests"]["token_count_mismatch"], 0);
    assert_eq!(r["requests"]["mean_prompt_tokens"], 16.0);
    assert_eq!(r["errors"].as_array().unwrap().len(), 0);
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["output_tokens"], 8 * 8, "requests × max_tokens");
    let positive = |v: &Value, what: &str| {
        let x = v.as_f64().unwrap_or_else(|| panic!("{what} is {v}"));
        assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
        x
    };
    let wall = positive(&r["wall_s"], "wall_s");
    let tps = positive(&r["output_tokens_per_s"], "output_tokens_per_s");
    assert!((tps * wall - 64.0).abs() < 1e-6);
    positive(&r["stream_tokens_per_s"]["mean"], "stream tokens/s");
    assert_eq!(r["ttft_ms"]["count"], 8);
    let p50 = positive(&r["ttft_ms"]["p50"], "TTFT p50");
    assert!(p50 <= r["ttft_ms"]["p99"].as_f64().unwrap());
    // Counted from usage: however the text was split into chunks, the gaps are fewer than
    // the tokens, and there is at least one per stream.
    let itl = r["itl_ms"]["count"].as_u64().unwrap();
    assert!((8..=8 * 7).contains(&itl), "{itl} ITLs");
    assert!(r["itl_ms"]["p50"].as_f64().unwrap() >= 0.0);
    assert!(r["itl_ms"]["max"].as_f64().unwrap() >= r["itl_ms"]["p90"].as_f64().unwrap());

    let long = &r["long_prompt"];
    assert_eq!(long["sent"], true, "{long}");
    assert_eq!(long["ok"], true, "{long}");
    assert_eq!(long["prompt_tokens"], 300);
    positive(&long["ttft_ms"], "long prompt TTFT");
    let (during, outside) = (
        &long["itl_during_prefill_ms"],
        &long["itl_outside_prefill_ms"],
    );
    assert_eq!(
        during["count"].as_u64().unwrap() + outside["count"].as_u64().unwrap(),
        itl,
        "every ITL is in one of the two"
    );

    let base = &r["baseline"];
    assert_eq!(base["ok"], true, "{base}");
    assert_eq!(base["output_tokens"], 8);
    positive(&base["tokens_per_s"], "single-stream tokens/s");
    positive(&base["aggregate_over_single"], "aggregate / single");
}
