//! The official `openai` Python package drives a running `myriad serve` (a real process on a
//! real socket, with an API key): chat and completions, streaming, usage, `n` with seeds,
//! logprobs and echo, stop strings, tools, reasoning switches and the error statuses
//! (`tests/openai/check_openai.py` lists every check). `scripts/test.sh` installs the package
//! in a virtual environment and names its interpreter in `MYRIAD_OPENAI_PYTHON`; without one
//! the test fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

/// `$MYRIAD_OPENAI_PYTHON` (when set, nothing else), else `python3`, if it can `import openai`.
fn python() -> Option<String> {
    let p = std::env::var("MYRIAD_OPENAI_PYTHON").unwrap_or_else(|_| "python3".to_string());
    Command::new(&p)
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some(p)
}

#[test]
fn the_openai_python_client_gets_what_openai_would_give() {
    let Some(py) = python() else {
        panic!(
            "no Python with the openai package: scripts/test.sh (the README's test command) \
             installs it in target/openai-venv, or set MYRIAD_OPENAI_PYTHON to one that has it"
        );
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
