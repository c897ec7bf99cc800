#!/usr/bin/env bash
# What issue 5 needs from a GPU machine, one step per call (each fits the device tool's 10-minute limit).
# Run from the repository root on the GPU machine:
#     bash benchmarks/gpu_session.sh STEP OUT_DIR
#     bash benchmarks/gpu_session.sh STEP OUT_DIR [ARGS...]   (ARGS: test ids for tests, flags for decode)
# STEP: tests | ceilings | kernels | decode | decode-fp8 | prefill | all.  Writes STEP's JSON and log to OUT_DIR.
# `all` runs tests, decode, decode-fp8 and prefill one after another, each under its own time limit so that
# one failure does not eat the device time (about 8 minutes at most).
# `mtp` (issue 10): the MTP CUDA-graph tests, then mtp_gpu_bench.py (about 4 minutes at most).
# Packages the device image lacks (xgrammar and what it needs) travel as wheels in .whl/ (device README).
set -u -o pipefail
step=${1:?usage: gpu_session.sh tests|ceilings|kernels|decode|decode-fp8|prefill|all|mtp OUT_DIR}
out=${2:?usage: gpu_session.sh STEP OUT_DIR}
shift 2
extra=("$@")  # passed on to the step's command: test ids for `tests`, flags for the benchmarks
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The image has torch, triton, transformers, safetensors, pytest: install glmserve itself only, offline.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# An editable install needs setuptools>=77 in the image; where it has an older one, a link does the same.
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict \
    >>"$out/pip.log" 2>&1; then
  mkdir -p /tmp/glmroot && ln -sfn "$PWD/services" /tmp/glmroot/glmserve
  export PYTHONPATH=/tmp/glmroot${PYTHONPATH:+:$PYTHONPATH}
  echo "editable install failed (see pip.log): glmserve imported through $PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case $step in
  tests)      [ ${#extra[@]} -gt 0 ] || extra=(tests/engine tests/kernels)
              python3 -m pytest -q -ra -m gpu -p no:cacheprovider "${extra[@]}" 2>&1 | tee "$out/gpu_tests.log" ;;
  ceilings)   python3 benchmarks/ceilings.py --out "$out/ceilings.json" 2>&1 | tee "$out/ceilings.log" ;;
  kernels)    python3 benchmarks/kernel_bench.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" ;;
  decode)     python3 benchmarks/decode_bench.py --out "$out/decode.json" ${extra[@]+"${extra[@]}"} 2>&1 | tee "$out/decode.log" ;;
  decode-fp8) python3 benchmarks/decode_bench.py --fp8 --batches 1,64 --out "$out/decode_fp8.json" 2>&1 | tee "$out/decode_fp8.log" ;;
  prefill)    python3 benchmarks/prefill_bench.py --out "$out/prefill.json" 2>&1 | tee "$out/prefill.log" ;;
  all)
    timeout 180 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/engine tests/kernels >"$out/gpu_tests.log" 2>&1
    echo "tests rc=$?"; tail -25 "$out/gpu_tests.log"
    timeout 150 python3 benchmarks/decode_bench.py --batches 1,64 --out "$out/decode.json" >"$out/decode.log" 2>&1
    echo "decode rc=$?"; tail -20 "$out/decode.log"
    timeout 90 python3 benchmarks/decode_bench.py --fp8 --batches 1,64 --out "$out/decode_fp8.json" >"$out/decode_fp8.log" 2>&1
    echo "decode-fp8 rc=$?"; tail -12 "$out/decode_fp8.log"
    timeout 90 python3 benchmarks/prefill_bench.py --out "$out/prefill.json" >"$out/prefill.log" 2>&1
    echo "prefill rc=$?"; tail -12 "$out/prefill.log" ;;
  mtp)
    timeout 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/engine/test_mtp_graphs.py >"$out/mtp_gpu_tests.log" 2>&1
    echo "mtp tests rc=$?"; tail -25 "$out/mtp_gpu_tests.log"
    timeout 200 python3 benchmarks/mtp_gpu_bench.py --out "$out/mtp_gpu.json" >"$out/mtp_gpu.log" 2>&1
    echo "mtp bench rc=$?"; tail -25 "$out/mtp_gpu.log" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
