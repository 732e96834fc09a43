#!/usr/bin/env bash
# The H200 runs behind BENCHMARKS.md, docs/TUNING.md and docs/ACCURACY.md, one step per device call:
#   bash benchmarks/h200_session.sh STEP OUT MODEL
# kernels    - the GPU correctness check of the kernels (every mode, head dim, dtype, GQA ratio)
# dense      - SmolLM2-shape prefill under CUDA graphs: deltapass all-dense vs hand-built SDPA is_causal
# densegraph - the same pair on the real model at 8K, with the FX graphs each hands to Inductor saved
# tune16k    - the tuner on SmolLM2 with YaRN x4 at 16K: calibration, 64 trials, confirmation
# tune32k    - the same at 32K
# example    - the README's main job (examples/smollm2_long_prompt.py) at 32K, with the 32K tuned entry
# chunks     - the Hopper dense rows in key chunks: hand-over checks (hangs time out), the whole GPU check,
#              each launch at 128K and 1M against whole rows, the op at 1M against cuDNN
# chunkop    - the op at 32K and 128K against FlexAttention and cuDNN
# graphs     - the hand-over checks again, each launch also replayed from a CUDA graph; an Nsight Compute
#              profile of both launches at 128K (ncu_summary.py)
# modelgraph - SmolLM2-shape prefill with the Hopper kernels, default mode against reduce-overhead (CUDA graphs)
# layouts    - the whole GPU check (each rule check also on a model's transposed q/k/v, read in place), and
#              the op on that layout in place against contiguous inputs and against copying (probe_layouts.py)
# clocks     - SM clock and board power under a bf16 GEMM and each Hopper launch at 128K (40 s)
# A study and the cache live under /tmp/keep/work, which outlives one call while the machine stays warm:
# running a tune step again resumes its study up to 64 complete trials. Each step copies its results to OUT.
set -uo pipefail
step=$1 out=$2 model=${3:-}
repo=$PWD keep=/tmp/keep/work
mkdir -p "$keep"
export DELTAPASS_CACHE_DIR=$keep/cache PYTHONUNBUFFERED=1
# The CLI runs from $out: from the repository root, `python -m` would import the source tree's deltapass,
# which is not laid out as the installed package (kernels/ and search/ install under deltapass).
filter() { tr '\r' '\n' | grep -v "Warning\|forward_call\|deprecated\|warnings.warn"; }
tune() {   # tune LENGTH EXTRA-ARGS...: YaRN x4 (context 32K) at every length, as the check
  local n=$1 dir=$keep/tune$(( $1 / 1024 ))k start
  shift
  mkdir -p "$dir"
  start=$(date +%s)
  (cd "$out" && python3 -m deltapass.cli tune --model "$model" --device cuda --context 32768 --length "$n" \
    --trials "${TRIALS:-64}" --samples 8 --batch-size 1 --timeout "${TIMEOUT:-420}" \
    --storage "$dir/study.log" --study "smollm2-h200-$(( n / 1024 ))k" --out "$dir" "$@") 2>&1 | filter \
    | tee -a "$dir/log.txt" | tail -25
  echo "this call's tuning job: $(( $(date +%s) - start )) s wall" | tee -a "$dir/log.txt"
  cp -r "$dir" "$keep/cache" "$out/"
}
case "$step" in
kernels) python3 benchmarks/check_kernels_gpu.py --out "$out/kernels_check.json" 2>&1 | tail -60 ;;
dense)
  python3 benchmarks/bench_cudagraphs.py --lengths 8192 32768 --modes reduce-overhead --mask-check-lengths 8192 \
    --configs "inductor (dense, SDPA is_causal)" "deltapass all-dense" "delta s64+w256 g64" \
    --out "$out/dense_baseline.json" 2>&1 | filter | tail -30 ;;
densegraph)
  (cd "$out" && python3 "$repo/benchmarks/check_switching_gpu.py" --model "$model" --length 0 --dense-graphs 8192 \
    --skip-engines --out "$out/dense_graphs.json") 2>&1 | filter | tail -12 ;;
tune16k) tune 16384 --no-tiles ;;
tune32k) tune 32768 --no-tiles ;;
chunks)   # 385 s on the H200 (revision 6's call 5)
  S='"pingpong": true, "persistent_q": true'
  (cd benchmarks && timeout 190 python3 check_key_chunks_gpu.py --out "$out/check_key_chunks.json" --repeats 200 \
      --timeout 80 | tail -5 && timeout 200 python3 check_kernels_gpu.py --out "$out/check_kernels.json" | tail -2 \
    && timeout 130 python3 probe_hopper_launches.py --out "$out/probe_chunks.json" --sizes 131072 1048576 --windows \
      --no-l2-hot --variants "{\"shipped\": {$S}, \"whole rows\": {$S, \"dense_key_chunk\": 1048576}}" | tail -12 \
    && timeout 60 python3 bench_kernels.py --out "$out/kernels_1m.json" --sizes 1048576 --check-sizes \
      --modes delta --skip fa2 flex | tail -3) 2>&1 | filter ;;
chunkop)   # 85 s
  S='"pingpong": true, "persistent_q": true'
  (cd benchmarks && timeout 150 python3 bench_hopper.py --out "$out/kernels.json" --sizes 32768 131072 --skip triton \
      --check-variants --variants "{\"shipped\": {$S}}" | tail -8) 2>&1 | filter ;;
graphs)
  (cd benchmarks && timeout 330 python3 check_key_chunks_gpu.py --out "$out/check_key_chunks_graphs.json" \
      --repeats 100 --graph-repeats 100 --timeout 120 | tail -5
    timeout 200 ncu --kernel-name regex:_ws_kernel --launch-skip 2 --launch-count 2 --set full --import-source yes \
      -f -o "$out/prof" python3 profile_hopper.py | tail -2
    ncu -i "$out/prof.ncu-rep" --page details --csv > "$out/details_128k_r6.csv"
    ncu -i "$out/prof.ncu-rep" --page source --csv --print-source sass | gzip > "$out/source_128k_r6.csv.gz"
    rm -f "$out/prof.ncu-rep"
    python3 ncu_summary.py "$out/details_128k_r6.csv" "$out/source_128k_r6.csv.gz" --out "$out/summary_128k_r6.json" \
      | tail -12) 2>&1 | filter ;;
modelgraph)
  timeout 420 python3 benchmarks/bench_cudagraphs.py --lengths 8192 32768 --modes default reduce-overhead \
    --mask-check-lengths --configs "delta s64+w256 g64" --out "$out/cudagraphs_r6.json" 2>&1 | filter | tail -8 ;;
layouts)
  (cd benchmarks && timeout 300 python3 check_kernels_gpu.py --out "$out/check_kernels_layouts.json" | tail -14 \
    && timeout 150 python3 probe_layouts.py --out "$out/layouts.json" | tail -8) 2>&1 | filter ;;
clocks) (cd benchmarks && timeout 300 python3 probe_clocks.py --out "$out/clocks_128k.json" --seconds 5 | tail -6) ;;
example)
  (cd "$out" && python3 "$repo/examples/smollm2_long_prompt.py" --model "$model" --tokens 32768) 2>&1 | filter \
    | tee "$out/example_32k.txt" | tail -40 ;;
esac
