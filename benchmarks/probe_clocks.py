"""The SM clock and board power while each workload runs: how close the Hopper launches come to the tensor
cores' peak at the clock the GPU actually holds under them.

    python benchmarks/probe_clocks.py --out clocks.json [--n 131072] [--seconds 4]

Workloads, each run back to back for --seconds while nvidia-smi samples every 50 ms (the first and last
quarter of the window are dropped): a bf16 GEMM 8192^3, both Δ launches at N (bench_kernels.py's shape,
paper config, the op's schedule), and each launch alone (probe_hopper_launches.OneLaunch). Times are
do_bench medians taken right after. "Tensor busy" is the rate on the tile products a launch issues
(work_model.py) over the dense bf16 peak at the sampled clock: 132 SMs x 4096 FLOP per clock.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time

import torch
import triton

from bench_kernels import GAMMA, SINK, WINDOW, inputs
from deltapass.kernels import DeltaPlan
from deltapass.kernels.dispatch import HOPPER_SCHEDULE
from deltapass.kernels.hopper_delta import launch_hopper_delta_attention
from probe_hopper_launches import OneLaunch
from work_model import issued_tiles, tile_flops

FLOP_PER_CLOCK = 132 * 4096     # H100/H200 SXM: dense bf16 wgmma, per clock, every SM
FIELDS = ("clocks.sm", "power.draw", "power.limit", "temperature.gpu")
REASONS = (("clocks_event_reasons.sw_power_cap", "clocks_event_reasons.hw_slowdown"),
           ("clocks_throttle_reasons.sw_power_cap", "clocks_throttle_reasons.hw_slowdown"))


def sampler():
    """nvidia-smi polling every 50 ms, with the power-cap and slowdown flags under whichever name it takes."""
    for reasons in REASONS:
        query = ",".join(FIELDS + reasons)
        check = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
        if check.returncode == 0:
            return subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                     "-lms", "50"], stdout=subprocess.PIPE, text=True), FIELDS + reasons
    raise RuntimeError(f"nvidia-smi takes neither reason field: {check.stderr}")


def sampled(fn, seconds: float) -> dict:
    """Run fn back to back for `seconds` under the sampler; medians of the middle half of the samples."""
    fn()
    torch.cuda.synchronize()
    proc, fields = sampler()
    start = time.time()
    while time.time() - start < seconds:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    proc.terminate()
    lines = [line.split(", ") for line in proc.communicate()[0].strip().splitlines()]
    middle = lines[len(lines) // 4: len(lines) - len(lines) // 4]
    out = {"samples": len(middle)}
    for i, name in enumerate(fields):
        values = [row[i] for row in middle if len(row) == len(fields)]
        if name.startswith("clocks_"):
            out[name.split(".")[1] + "_share"] = sum(v.strip() == "Active" for v in values) / max(len(values), 1)
        else:
            out[name] = statistics.median(float(v) for v in values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    q, k, v = inputs(args.n)
    plan = DeltaPlan(args.n, SINK, WINDOW, GAMMA, "delta")
    out = torch.empty_like(q)
    delta = torch.empty(1, q.shape[1], plan.n_samples, q.shape[-1], device="cuda", dtype=torch.float32)
    scale = 1 / math.sqrt(q.shape[-1])
    tiles = issued_tiles(plan, q.shape[1] // k.shape[1])
    dense_flops = tile_flops(tiles["dense_tiles"] + tiles["dense_resparse_tiles"])
    sparse_flops = tile_flops(tiles["sparse_tiles"])

    def launches(p):
        return lambda: launch_hopper_delta_attention(q, k, v, out, p, scale, delta, **HOPPER_SCHEDULE)

    workloads = [("bf16 GEMM 8192^3", lambda: a @ b, 2 * 8192 ** 3),
                 ("both launches", launches(plan), dense_flops + sparse_flops),
                 ("dense rows", launches(OneLaunch(plan, "dense")), dense_flops),
                 ("sparse rows + delta", launches(OneLaunch(plan, "sparse")), sparse_flops)]
    rows = []
    for name, fn, flops in workloads:
        row = {"workload": name, **sampled(fn, args.seconds)}
        row["ms"] = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
        row["tflops_issued"] = flops / row["ms"] / 1e9
        row["peak_tflops_at_clock"] = FLOP_PER_CLOCK * row["clocks.sm"] / 1e6
        row["tensor_busy"] = row["tflops_issued"] / row["peak_tflops_at_clock"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "n": args.n, "config": {"sink": SINK, "window": WINDOW, "gamma": GAMMA}, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'workload':<22} {'ms':>8} {'TFLOP/s':>8} {'MHz':>6} {'W':>5} {'busy':>5} {'pwr cap':>7}")
    for r in rows:
        print(f"{r['workload']:<22} {r['ms']:>8.2f} {r['tflops_issued']:>8.0f} {r['clocks.sm']:>6.0f} "
              f"{r['power.draw']:>5.0f} {r['tensor_busy']:>5.2f} {r.get('sw_power_cap_share', math.nan):>7.2f}")


if __name__ == "__main__":
    main()
