#!/usr/bin/env bash
# Proves that the README's first command needs only the Rust toolchain: with protoc, etcd and
# promtool hidden from PATH (and PROTOC unset), it builds `myriad`, starts `myriad serve` on the
# built-in model in an empty model cache (so the model is made on first use, as on a fresh
# machine), sends one chat completion with Python's standard library and checks the answer,
# then runs the README's curl (where curl exists) and loadtest examples as written against it.
#
# The debug profile keeps this out of release builds' time; which tools the build needs does not
# depend on the profile. Usage: scripts/ci-fresh-serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."

hidden=(protoc etcd etcdctl promtool)
work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

is_hidden() {
  local name=$1 h
  for h in "${hidden[@]}"; do [ "$name" = "$h" ] && return 0; done
  return 1
}

# PATH with every directory that holds a hidden tool replaced by a copy made of symlinks
# without it.
new_path=""
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  holds=0
  for h in "${hidden[@]}"; do [ -e "$d/$h" ] && holds=1; done
  if [ "$holds" = 0 ]; then
    new_path+="${new_path:+:}$d"
    continue
  fi
  shadow="$work/path/$(printf '%s' "$d" | tr / _)"
  mkdir -p "$shadow"
  for f in "$d"/*; do
    name=${f##*/}
    is_hidden "$name" || ln -s "$f" "$shadow/$name"
  done
  new_path+="${new_path:+:}$shadow"
done
export PATH="$new_path"
unset PROTOC PROTOC_INCLUDE
for h in "${hidden[@]}"; do
  if command -v "$h" >/dev/null 2>&1; then
    echo "error: $h is still on PATH" >&2
    exit 1
  fi
done
echo "fresh-machine check: protoc, etcd and promtool hidden from PATH"

export MYRIAD_CACHE="$work/cache"
log="$work/serve.log"
cargo build -p myriad
cargo run -q -p myriad -- serve --port 0 >"$work/ready" 2>"$log" &
server=$!

# The server prints `ready http://ADDR` on stdout once it accepts connections (the built-in
# model is made first; bounded wait).
url=""
for _ in $(seq 1 600); do
  url=$(sed -n 's/^ready //p' "$work/ready" 2>/dev/null | head -1)
  [ -n "$url" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    echo "error: myriad serve exited before it was ready:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 1
done
if [ -z "$url" ]; then
  echo "error: myriad serve was not ready within 600 s:" >&2
  cat "$log" >&2
  exit 1
fi
cat "$log"

python3 - "$url" <<'PY'
import json, sys, urllib.request
url = sys.argv[1] + "/v1/chat/completions"
body = {"model": "myriad-builtin", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}]}
req = urllib.request.Request(url, data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as resp:
    answer = json.load(resp)
choice = answer["choices"][0]
assert choice["message"]["role"] == "assistant", answer
assert choice["finish_reason"] in ("stop", "length"), answer
assert answer["usage"]["completion_tokens"] >= 1, answer
print("fresh-machine check: chat completion ok:", json.dumps(answer["usage"]))
PY

# The README's examples, as written there (keep the two in step).
if command -v curl >/dev/null; then
  curl -sS --fail-with-body "$url/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model":"myriad-builtin","messages":[{"role":"user","content":"Hi"}],"max_tokens":32,"stream":true}' \
    >"$work/curl.out"
  grep -q '^data: \[DONE\]' "$work/curl.out" || { echo "error: the curl example's stream did not end with [DONE]" >&2; cat "$work/curl.out" >&2; exit 1; }
  echo "fresh-machine check: the README's curl example streamed $(grep -c '^data: {' "$work/curl.out") chunks"
fi
target/debug/myriad loadtest --url "$url" -c 64 -n 64 --max-tokens 128 \
  --single-stream-baseline --long-prompt-tokens 3072 --output json >"$work/loadtest.json"
python3 - "$work/loadtest.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["requests"]["ok"] == 64 and r["requests"]["failed"] == 0, r["requests"]
l = r["long_prompt"]
assert l["sent"] and l["ok"], l
assert l["streams_in_window"] > 0, ("the long prompt was not sent mid-run", l)
print("fresh-machine check: the README's loadtest example: %d streams ok, long prompt TTFT %.0f ms "
      "with %d streams decoding" % (r["requests"]["ok"], l["ttft_ms"], l["streams_in_window"]))
PY
