"""The dense rows' key-chunk hand-over on the GPU: right against the float64 rule, the same bits every
launch, and no launch that hangs, with chunks of one to four key tiles (many chunks per row tile, many
more work items than multiprocessors).

    python benchmarks/check_key_chunks_gpu.py --out chunks.json [--repeats 300] [--timeout 90]

Each case runs in a child process with a timeout, so a hang is a recorded failure, not a lost run; the
script exits 1 if any case failed, hung or gave different bits.
Correctness is bench_hopper.check_case's bar (check_kernels_gpu's); then the case's delta launch runs
--repeats times into fresh outputs, each compared bit for bit with the first (a tile's chunks fold in
order, so the result is deterministic; a race in the hand-over would show here, or as a hang).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# (N, Hq, Hkv, D, sink, window, gamma, dtypes, corrections), keys per chunk
CASES = [((4099, 9, 3, 64, 64, 256, 64, ("bfloat16",), ("delta", "recompute", "tail")), (128, 512)),
         ((2049, 16, 2, 128, 0, 400, 32, ("float16",), ("delta",)), (128,)),
         ((8192, 32, 8, 128, 1024, 2048, 64, ("bfloat16",), ("delta", "tail")), (256, 4096)),
         ((32768, 32, 8, 128, 1024, 2048, 64, ("bfloat16",), ("delta",)), (1024,))]


def run_case(index: int, repeats: int) -> dict:
    import torch

    from bench_hopper import check_case, run_hopper
    from deltapass.kernels import DeltaPlan
    from deltapass.kernels.dispatch import HOPPER_SCHEDULE

    case, chunks = CASES[index]
    variants = {f"chunk {c}": {**HOPPER_SCHEDULE, "dense_key_chunk": c} for c in chunks}
    result = {"case": case, "checks": check_case(case, variants), "repeats": []}
    n, hq, hkv, d, sink, window, gamma = case[:7]
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    plan = DeltaPlan(n, sink, window, gamma, "delta")
    for name, variant in variants.items():
        first = run_hopper(q, k, v, plan, variant)
        t0, same = time.time(), 0
        for _ in range(repeats):
            same += int(torch.equal(run_hopper(q, k, v, plan, variant), first))
        result["repeats"].append({"variant": name, "repeats": repeats, "bitwise_equal": same,
                                  "seconds": time.time() - t0})
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)     # the child's one case
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.repeats)))
        return
    results = []
    for index in range(len(CASES)):
        try:
            child = subprocess.run([sys.executable, __file__, "--out", "-", "--case", str(index), "--repeats",
                                    str(args.repeats)], capture_output=True, text=True, timeout=args.timeout)
            entry = (json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0
                     else {"case": CASES[index][0], "error": child.stderr[-2000:]})
        except subprocess.TimeoutExpired:
            entry = {"case": CASES[index][0], "error": f"hung: no result in {args.timeout} s"}
        results.append(entry)
        with open(args.out, "w") as f:
            json.dump({"cases": results}, f, indent=1)
        checks = entry.get("checks", [])
        print(f"N={CASES[index][0][0]}: " + (entry["error"][-200:] if "error" in entry else
              f"checks {sum(c['pass'] for c in checks)}/{len(checks)}; bitwise equal "
              + ", ".join(f"{r['variant']} {r['bitwise_equal']}/{r['repeats']}" for r in entry["repeats"])),
              flush=True)
    ok = all("error" not in e and all(c["pass"] for c in e["checks"])
             and all(r["bitwise_equal"] == r["repeats"] for r in e["repeats"]) for e in results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
