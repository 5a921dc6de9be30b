//! The official `openai` Python package drives a running `myriad serve` (a real process on a
//! real socket, with an API key): chat and completions, streaming, usage, `n` with seeds,
//! logprobs and echo, stop strings, tools, reasoning switches and the error statuses
//! (`tests/openai/check_openai.py` lists every check). `.ci/run` installs the package in a
//! virtual environment and names its interpreter in `MYRIAD_OPENAI_PYTHON`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

/// An interpreter that can `import openai`, if there is one.
fn python() -> Option<String> {
    let candidates = std::env::var("MYRIAD_OPENAI_PYTHON")
        .ok()
        .into_iter()
        .chain(["python3".to_string()]);
    for p in candidates {
        let ok = Command::new(&p)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(p);
        }
    }
    None
}

#[test]
fn the_openai_python_client_gets_what_openai_would_give() {
    let Some(py) = python() else {
        assert!(
            std::env::var("MYRIAD_OPENAI_PYTHON").is_err(),
            "MYRIAD_OPENAI_PYTHON is set but cannot import openai"
        );
        eprintln!(
            "SKIPPED: no Python with the openai package (set MYRIAD_OPENAI_PYTHON; .ci/run does)"
        );
        return;
    };
    let dir = common::fixture("qwen3_5_moe-tiny");
    let mut server = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args([
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            "--api-key",
            "sk-test",
        ])
        .args(["--served-model-name", "tiny", "--model"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().strip_prefix("ready ").unwrap_or_else(|| {
        let _ = server.kill();
        panic!("myriad serve said {line:?}")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai/check_openai.py");
    let out = Command::new(&py)
        .arg(&script)
        .args([&format!("{url}/v1"), "sk-test", "tiny"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the openai client found a difference:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
