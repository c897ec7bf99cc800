#!/usr/bin/env bash
# CPU comparison for the closing note of the serving work: the same `glmserve bench` load against
# (a) `glmserve up` (1 prefill + 1 decode process, KV over gloo) and (b) `glmserve serve` (one process).
# Usage: bash benchmarks/cpu_serving_compare.sh OUT_DIR   (uses the built-in tiny model)
set -euo pipefail
out=${1:-benchmarks/results/cpu}
mkdir -p "$out"
bin=.venv/bin
model=$($bin/python -c "from glmserve.engine.llm import resolve_model; print(resolve_model(None))")
load=(--model tiny-glm4_moe-v1 --dataset random --num-prompts 64 --random-input-len 128 --random-output-len 64
      --max-concurrency 16 --ignore-eos --tokenizer "$model" --disable-tqdm --seed 0)
wait_up() { for _ in $(seq 300); do curl -sf "localhost:$1/health" >/dev/null && return 0; sleep 0.5; done; return 1; }

$bin/glmserve up --port 8400 --dtype float32 >"$out/up.log" 2>&1 &
up=$!
wait_up 8400
$bin/glmserve bench --base-url http://127.0.0.1:8400 "${load[@]}" --label "disaggregated 1P+1D" \
  --result-file "$out/bench_disaggregated.json"
kill $up; wait $up || true

$bin/glmserve serve --port 8401 --dtype float32 >"$out/serve.log" 2>&1 &
single=$!
wait_up 8401
$bin/glmserve bench --base-url http://127.0.0.1:8401 "${load[@]}" --label "single process" \
  --result-file "$out/bench_single_process.json"
kill $single; wait $single || true
