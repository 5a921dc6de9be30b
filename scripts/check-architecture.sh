#!/usr/bin/env bash
# ARCHITECTURE.md's dependency rules, stated as absences, checked against cargo's resolved
# dependency graph (normal dependencies, default features) and, for the decision code, its
# source. Prints every broken rule with the path that breaks it; exits 1 if any is broken.
set -euo pipefail
cd "$(dirname "$0")/.."

broken=0
all_ours=(myriad myriad-wire myriad-model myriad-kernels myriad-transport myriad-router
  myriad-expert myriad-attention myriad-gateway myriad-control myriad-loadtest myriad-metrics
  myriad-engine-api)

# never CRATE DEP...: CRATE's normal dependency graph holds none of DEP (only its direct
# dependencies with DEPTH=1).
never() {
  local crate=$1 dep have
  shift
  have=$(cargo tree -q -p "$crate" -e normal --depth "${DEPTH:-1000}" --prefix none --format '{p}' |
    awk '{print $1}' | sort -u)
  for dep in "$@"; do
    [ "$dep" = "$crate" ] && continue
    if grep -qx -- "$dep" <<<"$have"; then
      echo "rule broken: $crate depends on $dep:" >&2
      cargo tree -q -p "$crate" -e normal -i "$dep" >&2 || true
      broken=1
    fi
  done
}

# The wire contracts depend on no other Myriad crate and on no runtime.
never myriad-wire "${all_ours[@]}" tokio rayon
# Transports move frames: no kernels, model code or weights (NCCL only behind its feature).
never myriad-transport myriad-kernels myriad-model myriad-router myriad-expert \
  myriad-attention myriad-control rayon safetensors cudarc
# The router dispatches host rows: no compute backend, no model code or weights.
never myriad-router myriad-kernels myriad-model myriad-expert myriad-attention myriad-control \
  rayon safetensors cudarc
# The control plane sits beside the data plane: store, records, controller, EPLB.
never myriad-control myriad-kernels myriad-model myriad-router myriad-expert \
  myriad-attention myriad-transport myriad-gateway myriad-metrics rayon safetensors quinn \
  axum cudarc
# One Prometheus writer for every role, depending on nothing of ours.
never myriad-metrics "${all_ours[@]}"
# The HTTP front door reaches the engine through `Generate` only: no cluster internals, no
# compute backend, no model code.
never myriad-gateway myriad-control myriad-router myriad-transport myriad-expert quinn \
  myriad-kernels myriad-model myriad-attention safetensors cudarc
# The engine's API is plain types and one trait.
never myriad-engine-api "${all_ours[@]}" rayon
# Kernels compute: no async runtime, no network, no model files.
never myriad-kernels tokio quinn axum hyper tonic myriad-model myriad-transport cudarc
# The load generator speaks HTTP only.
never myriad-loadtest "${all_ours[@]}"
# The attention role hands sequence states over as wire images; moving them between processes
# is the CLI's business (cli/src/disagg/).
never myriad-attention myriad-transport myriad-router myriad-gateway quinn axum hyper
# Only the binary uses anyhow; libraries return typed errors.
for lib in "${all_ours[@]}"; do
  [ "$lib" = myriad ] || DEPTH=1 never "$lib" anyhow
done

# Decisions without I/O: no async runtime, clock or sleep in the planners.
for f in router/src/plan.rs router/src/dispatch.rs control-plane/src/eplb.rs; do
  if grep -nE 'tokio|Instant|SystemTime|thread::sleep|std::net|std::fs' "$f" >&2; then
    echo "rule broken: $f must make its decisions without I/O, clocks or a runtime" >&2
    broken=1
  fi
done
# The controller's state machine is handed the time (an `Instant` argument) but reads no clock,
# and reaches no store: its shell does.
for f in control-plane/src/controller/machine.rs control-plane/src/controller/machine/*.rs; do
  if grep -nE 'tokio|Instant::now|\.elapsed\(|SystemTime|thread::sleep|std::net|std::fs|Store\b' "$f" >&2; then
    echo "rule broken: $f must make its decisions without I/O, clocks or a runtime" >&2
    broken=1
  fi
done

if [ "$broken" = 0 ]; then
  echo "architecture rules: all hold"
fi
exit "$broken"
