#!/usr/bin/env bash
# `make demo`: the main job on a bundled default. Starts two llama-servers (SmolLM2-135M Q4_1
# as the main model, a requantisation of it as the candidate), runs `kl-proxy eval` on the
# bundled prompts through the proxy, prints what it found, and stops everything it started.
#   CANDIDATE=q2_k (far, the default) or q8_0 (close)
#   PROMPTS=file.jsonl   another prompt set
#   KEEP=1               leave the proxy running afterwards until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${KLPROXY_CACHE:-$HOME/.cache/kl-proxy}"
CANDIDATE="${CANDIDATE:-q2_k}"
PROMPTS="${PROMPTS:-prompts/chat.jsonl}"
BIN="${KLPROXY_BIN:-target/release/kl-proxy}"
MAIN_PORT="${MAIN_PORT:-18080}"
CAND_PORT="${CAND_PORT:-18081}"
PROXY_PORT="${PROXY_PORT:-8088}"
WORK=$(mktemp -d)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

model="$CACHE/models/smollm2-135m-$CANDIDATE.gguf"
[ -s "$model" ] || { echo "demo: no model $model (CANDIDATE is q8_0 or q2_k; run make setup)" >&2; exit 1; }

start_server() { # name port model
  "$CACHE/bin/llama-server" -m "$3" --host 127.0.0.1 --port "$2" -c 4096 -t 1 -np 1 --no-webui \
    >"$WORK/$1.log" 2>&1 &
  pids+=($!)
}
wait_health() { # name port
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$2/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: $1 llama-server did not start; its log:" >&2; cat "$WORK/$1.log" >&2; exit 1
}

echo "demo: main Q4_1 on :$MAIN_PORT, candidate ${CANDIDATE^^} on :$CAND_PORT"
start_server main "$MAIN_PORT" "$CACHE/models/smollm2-135m-q4_1.gguf"
start_server candidate "$CAND_PORT" "$model"
wait_health main "$MAIN_PORT"
wait_health candidate "$CAND_PORT"

cat >"$WORK/config.yaml" <<YAML
target_host: http://127.0.0.1:$MAIN_PORT
candidate_host: http://127.0.0.1:$CAND_PORT
port: $PROXY_PORT
n_probs: 10
store:
  path: $WORK/kl-proxy.db
admin:
  listen: 127.0.0.1:${ADMIN_PORT:-8089}
plugins:
  - name: kl
    path: $PWD/plugins/dist/kl-divergence.wasm
  - name: top
    path: $PWD/plugins/dist/top-overlap.wasm
YAML

echo "demo: kl-proxy eval on $PROMPTS ($(grep -c . "$PROMPTS") prompts)"
"$BIN" eval --config "$WORK/config.yaml" --prompts "$PROMPTS" 2> >(grep -v '^eval: ' >&2)
echo
echo "demo: kl-proxy report"
"$BIN" report --config "$WORK/config.yaml"

if [ "${KEEP:-0}" = 1 ]; then
  echo "demo: proxy on http://127.0.0.1:$PROXY_PORT, dashboard on http://127.0.0.1:${ADMIN_PORT:-8089}/ (metrics at /metrics; main http://127.0.0.1:$MAIN_PORT, candidate http://127.0.0.1:$CAND_PORT); Ctrl-C to stop"
  "$BIN" --config "$WORK/config.yaml" &
  pids+=($!)
  wait "${pids[-1]}" || true
fi
