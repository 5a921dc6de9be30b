#!/usr/bin/env bash
# A Myriad cluster by hand, one process per role, on this machine (or adapt the addresses to
# several hosts): a CA and node certificates, N expert nodes holding a placement, and an
# attention node fed JSON request lines. `myriad launch` does the same in one command.
#
#   deploy/local-cluster.sh MODEL_DIR [NODES] [BASE_PORT]
#   echo '{"prompt_token_ids":[1,2,3],"max_tokens":8}' | deploy/local-cluster.sh ./model 4
set -euo pipefail
model="${1:?usage: local-cluster.sh MODEL_DIR [NODES] [BASE_PORT]}"
nodes="${2:-4}"
base="${3:-7100}"
myriad="${MYRIAD:-myriad}"
work="$(mktemp -d -t myriad-cluster.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

names=(); addrs=()
for i in $(seq 0 $((nodes - 1))); do names+=("e$i"); addrs+=("127.0.0.1:$((base + i))"); done
"$myriad" certs --out "$work/pki" --names "$(IFS=,; echo "${names[*]}"),attention"

# Even split of the experts: the attention node computes the same placement from the addresses.
for i in $(seq 0 $((nodes - 1))); do
  n=${names[$i]}
  "$myriad" node expert --model "$model" --listen "${addrs[$i]}" --name "$n" \
    --experts "$(python3 -c "import json;e=json.load(open('$model/config.json'));e=e.get('text_config',e)['num_experts'];print(f'{$i*e//$nodes}-{($i+1)*e//$nodes-1}')")" \
    --tls-cert "$work/pki/$n.pem" --tls-key "$work/pki/$n.key" --tls-ca "$work/pki/ca.pem" \
    --threads 1 > "$work/$n.ready" &
  pids+=("$!")
done
for n in "${names[@]}"; do
  until grep -q ready "$work/$n.ready" 2>/dev/null; do sleep 0.2; done
done

"$myriad" node attention --model "$model" --expert-nodes "$(IFS=,; echo "${addrs[*]}")" \
  --tls-cert "$work/pki/attention.pem" --tls-key "$work/pki/attention.key" --tls-ca "$work/pki/ca.pem"
