"""What masking the edge key tiles costs the Hopper kernels, in one run.

    python benchmarks/probe_hopper_masks.py --out masks.json [--sizes 131072 1048576]

A sparse CTA sees ~25 key tiles of which two are edges (its window's first tile and the diagonal), whose
scores are masked element by element; the window sweep of probe_hopper_launches.py counts that work as
the CTA's fixed cost. Variants:
  * "no edge mask" (diagnostic, wrong results): a copy of hopper_delta.py (written next to it, imported,
    removed) with edge tiles unmasked, the bound on what masking costs;
  * "dense ping-pong": the shipped kernels with ping-pong in the dense-rows launch too (checked against
    the float64 reference: bench_hopper's checks).
Timed alternately, twice: both launches, and each launch alone (B=1, Hq=32, Hkv=8, D=128, bf16, paper config).
This script's first version (e9fb010) also timed the per-row interval mask against the rule's per-key one
(probe_masks.json); the kernels have used the interval since.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

import bench_hopper
from bench_kernels import D, GAMMA, HKV, HQ, SINK, WINDOW, inputs
from deltapass.kernels import DeltaPlan, hopper_delta
from probe_hopper_launches import each_launch, patched_module

SHIPPED = bench_hopper.DEFAULT_VARIANTS["shipped"]
EDITS = {"no edge mask": (("    if edge:\n        # The rule's keys", "    if edge and window < 0:\n        # The"),)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[131072, 1048576])
    args = ap.parse_args()
    scale = 1 / math.sqrt(D)
    modules, paths = {"shipped": hopper_delta, "dense ping-pong": hopper_delta}, []
    for name, edits in EDITS.items():
        modules[name], path = patched_module("_probe_mask_" + name.replace(" ", "_"), edits)
        paths.append(path)
    kwargs = {name: {**SHIPPED, "dense_pingpong": True} if name == "dense ping-pong" else SHIPPED for name in modules}
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "shape": [1, HQ, HKV, D], "edits": EDITS, "kwargs": kwargs,
                       "config": {"sink": SINK, "window": WINDOW, "gamma": GAMMA}}, "checks": [], "timings": []}
    try:
        # The one variant with right results besides the shipped kernels; bench_hopper runs the shipped launcher.
        for case in bench_hopper.CHECKS:
            result["checks"] += bench_hopper.check_case(case, {"dense ping-pong": kwargs["dense ping-pong"]})
        for n in args.sizes:
            q, k, v = inputs(n)
            out = torch.empty_like(q)
            plan = DeltaPlan(n, SINK, WINDOW, GAMMA, "delta")
            delta = torch.empty(1, HQ, plan.n_samples, D, device="cuda", dtype=torch.float32)
            for rep in (1, 2):
                for name, module in modules.items():
                    for launch, fn, flops in each_launch(module, kwargs[name], q, k, v, out, plan, scale, delta):
                        if name == "dense ping-pong" and launch == "sparse rows + delta":
                            continue    # the same launch as shipped
                        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                        entry = {"n": n, "variant": name, "launch": launch, "rep": rep, "ms": ms,
                                 "tflops": flops / ms / 1e9}
                        result["timings"].append(entry)
                        print(json.dumps(entry), flush=True)
            del q, k, v, out, delta
            torch.cuda.empty_cache()
    finally:
        for path in paths:
            os.remove(path)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    failed = [c for c in result["checks"] if not c["pass"]]
    print(f"\nchecks: {len(result['checks']) - len(failed)}/{len(result['checks'])} pass")
    print(f"{'N':>8} {'launch':<20} " + " ".join(f"{m[:15]:>15}" for m in modules))
    for n in args.sizes:
        for launch in ("delta", "dense rows", "sparse rows + delta"):
            cells = []
            for name in modules:
                ms = [t["ms"] for t in result["timings"] if (t["n"], t["variant"], t["launch"]) == (n, name, launch)]
                cells.append(" / ".join(f"{x:.2f}" for x in ms) if ms else "-")
            print(f"{n:>8} {launch:<20} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
