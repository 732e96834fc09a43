#!/usr/bin/env bash
# The H200 runs behind BENCHMARKS.md's "Tune what users run" and "16K-32K" sections, one step each:
#   bash benchmarks/h200_session.sh STEP OUT MODEL
# kernels   - the GPU correctness check of the kernels (every mode, head dim, dtype, GQA ratio)
# dense     - SmolLM2-shape prefill under CUDA graphs: deltapass all-dense vs hand-built SDPA is_causal
# tune8k    - the tuner on SmolLM2 at 8K (real weights), timed under CUDA graphs against all-dense
# tune32k   - the same at 32K with YaRN x4 context extension and the calibration stage
set -uo pipefail
step=$1 out=$2 model=${3:-}
export DELTAPASS_CACHE_DIR=$out/cache PYTHONUNBUFFERED=1
# The CLI runs from $out: from the repository root, `python -m` would import the source tree's deltapass,
# which is not laid out as the installed package (kernels/ and search/ install under deltapass).
filter() { tr '\r' '\n' | grep -v "Warning\|forward_call\|deprecated\|warnings.warn"; }
case "$step" in
kernels) python3 benchmarks/check_kernels_gpu.py --out "$out/kernels_check.json" 2>&1 | tail -60 ;;
dense)
  python3 benchmarks/bench_cudagraphs.py --lengths 8192 32768 --modes reduce-overhead --mask-check-lengths 8192 \
    --configs "inductor (dense, SDPA is_causal)" "deltapass all-dense" "delta s64+w256 g64" \
    --out "$out/dense_baseline.json" 2>&1 | filter | tail -30 ;;
tune8k)
  cd "$out" && python3 -m deltapass.cli tune --model "$model" --device cuda --length 8192 --trials "${TRIALS:-24}" --samples 8 \
    --no-tiles --timeout "${TIMEOUT:-240}" --storage "$out/tune8k/study.log" --study smollm2-h200-8k \
    --out "$out/tune8k" 2>&1 | filter | tail -40 ;;
tune32k)
  cd "$out" && python3 -m deltapass.cli tune --model "$model" --device cuda --context 32768 --length 32768 \
    --trials "${TRIALS:-16}" --samples 8 --batch-size 1 --no-tiles --timeout "${TIMEOUT:-300}" \
    --storage "$out/tune32k/study.log" --study smollm2-h200-32k --out "$out/tune32k" 2>&1 | filter | tail -40 ;;
esac
