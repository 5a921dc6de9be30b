//! What the CLI's integration tests share: the fixtures beside the repository and their
//! reference outputs.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use myriad_attention::Request;
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name)
}

pub fn reference(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every reference prompt, greedy, ignoring eos, with `logprobs` top entries (and the prompt's
/// own log-probabilities when `echo`).
pub fn requests(r: &Value, max_tokens: usize, logprobs: Option<usize>, echo: bool) -> Vec<Request> {
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Request {
            ignore_eos: true,
            logprobs,
            echo,
            ..Request::greedy(ids(&p["input_ids"]), max_tokens)
        })
        .collect()
}

/// `promtool check metrics` accepts `text`. promtool must be installed (`scripts/test.sh`, the
/// README's test command, installs it): a missing promtool fails the test rather than leaving
/// the metrics unchecked.
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run promtool ({e}): the metrics tests need it; scripts/test.sh installs it \
             (Debian package prometheus)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects the metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
