"""The dense rows' key-chunk hand-over on the GPU: right against the float64 rule, the same bits every
launch, and no launch that hangs, with chunks of one to four key tiles (many chunks per row tile, more
CTAs than multiprocessors).

    timeout 300 python benchmarks/check_key_chunks_gpu.py --out chunks.json [--repeats 300]

Correctness is bench_hopper.check_case's bar (check_kernels_gpu's); then each case's delta launch runs
--repeats times into fresh outputs, each compared bit for bit with the first (a tile's chunks fold in
order, so the result is deterministic; a race in the hand-over would show here, or as a hang).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench_hopper import check_case, run_hopper
from deltapass.kernels import DeltaPlan
from deltapass.kernels.dispatch import HOPPER_SCHEDULE

# (N, Hq, Hkv, D, sink, window, gamma, dtypes, corrections), keys per chunk
CASES = [((4099, 9, 3, 64, 64, 256, 64, ("bfloat16",), ("delta", "recompute", "tail")), (128, 512)),
         ((2049, 16, 2, 128, 0, 400, 32, ("float16",), ("delta",)), (128,)),
         ((8192, 32, 8, 128, 1024, 2048, 64, ("bfloat16",), ("delta",)), (256,))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "checks": [], "repeats": []}
    for case, chunks in CASES:
        variants = {f"chunk {c}": {**HOPPER_SCHEDULE, "dense_key_chunk": c} for c in chunks}
        result["checks"] += check_case(case, variants)
        n, hq, hkv, d, sink, window, gamma = case[:7]
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
        plan = DeltaPlan(n, sink, window, gamma, "delta")
        for name, variant in variants.items():
            first = run_hopper(q, k, v, plan, variant)
            t0, same = time.time(), 0
            for _ in range(args.repeats):
                same += int(torch.equal(run_hopper(q, k, v, plan, variant), first))
            torch.cuda.synchronize()
            entry = {"n": n, "variant": name, "repeats": args.repeats, "bitwise_equal": same,
                     "seconds": time.time() - t0}
            result["repeats"].append(entry)
            print(json.dumps(entry), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    passed = sum(c["pass"] for c in result["checks"])
    print(f"checks {passed}/{len(result['checks'])}; repeats bitwise equal: "
          + ", ".join(f"{r['n']} {r['variant']} {r['bitwise_equal']}/{r['repeats']}" for r in result["repeats"]))


if __name__ == "__main__":
    main()
