#!/usr/bin/env bash
# The whole test suite, on a machine that has only the Rust toolchain and Python to begin
# with: installs what some tests need and is missing, then runs `cargo test --workspace`
# (extra arguments are passed on, e.g. `scripts/test.sh -p myriad-control`).
#
# What the tests need beyond Rust, and why:
#   etcd      the control-plane tests start real etcd servers on loopback   (Debian: etcd-server)
#   promtool  the metrics tests validate /metrics with `promtool check metrics` (Debian: prometheus)
#   cc        the tokenizer's regex library (onig) is C                     (Debian: gcc, libc6-dev)
#   openai    the official Python client drives `myriad serve`  (PyPI, in target/openai-venv)
# A test whose tool is missing fails and says so; none is skipped. Set MYRIAD_ETCD_BIN or
# MYRIAD_OPENAI_PYTHON to use an etcd binary or a Python with `openai` from elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/fixtures ]; then
  echo "error: ../shared/fixtures is missing; the golden tests need it beside the repository" >&2
  exit 1
fi

need=()
command -v cc >/dev/null || need+=(gcc libc6-dev)
[ -n "${MYRIAD_ETCD_BIN:-}" ] || command -v etcd >/dev/null || need+=(etcd-server)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  if ! command -v apt-get >/dev/null || { [ ${#sudo[@]} -gt 0 ] && ! command -v sudo >/dev/null; }; then
    echo "error: the tests need these packages (Debian names): ${need[*]}; install them and run again" >&2
    exit 1
  fi
  echo "installing what the tests need: ${need[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The official OpenAI Python client, in a virtual environment of its own.
if [ -z "${MYRIAD_OPENAI_PYTHON:-}" ]; then
  venv=target/openai-venv
  if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
    echo "installing the openai Python package in $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40'
  fi
  export MYRIAD_OPENAI_PYTHON="$PWD/$venv/bin/python"
fi

cargo test --workspace "$@"
