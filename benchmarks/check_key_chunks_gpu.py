"""The dense rows' key-chunk hand-over on the GPU: right against the float64 rule, the same bits every
launch, eager or replayed from a CUDA graph, and no launch that hangs, with chunks of one to four key tiles
(many chunks per row tile, many more work items than multiprocessors).

    python benchmarks/check_key_chunks_gpu.py --out chunks.json [--repeats 300] [--graph-repeats 100] [--timeout 90]

Each case runs in a child process with a timeout, so a hang is a recorded failure, not a lost run; the
script exits 1 if any case failed, hung or gave different bits.
Correctness is bench_hopper.check_case's bar (check_kernels_gpu's); then the case's delta launch runs
--repeats times into fresh outputs, each compared bit for bit with the first (a tile's chunks fold in
order, so the result is deterministic; a race in the hand-over would show here, or as a hang). Last, the
launch is captured once in a CUDA graph (as torch.compile's reduce-overhead mode does) and replayed
--graph-repeats times into a NaN-poisoned output, each replay compared bit for bit with the eager result:
the launcher zeroes its work counter and hand-over flags with a memset the graph must replay, or a
replay would find every item taken (NaN rows) or stale flags (a race, or different bits).
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
         ((32768, 32, 8, 128, 1024, 2048, 64, ("bfloat16",), ("delta",)), (128, 1024))]


def graph_replays(q, k, v, plan, variant: dict, eager, repeats: int) -> int:
    """How many of `repeats` replays of one captured launch give `eager`'s bits."""
    import torch

    from bench_hopper import run_hopper

    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):      # compile and warm up outside the capture
        run_hopper(q, k, v, plan, variant, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_hopper(q, k, v, plan, variant, out)
    same = 0
    for _ in range(repeats):
        out.fill_(float("nan"))
        graph.replay()
        same += int(torch.equal(out, eager))
    return same


def run_case(index: int, repeats: int, graph_repeats: int) -> dict:
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
        t0 = time.time()
        same = graph_replays(q, k, v, plan, variant, first, graph_repeats)
        result["repeats"].append({"variant": f"{name}, CUDA graph replays", "repeats": graph_repeats,
                                  "bitwise_equal": same, "seconds": time.time() - t0})
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--graph-repeats", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)     # the child's one case
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.repeats, args.graph_repeats)))
        return
    from record import header

    meta = header(repeats=args.repeats, graph_repeats=args.graph_repeats)
    results = []
    for index in range(len(CASES)):
        try:
            child = subprocess.run([sys.executable, __file__, "--out", "-", "--case", str(index), "--repeats",
                                    str(args.repeats), "--graph-repeats", str(args.graph_repeats)], capture_output=True, text=True, timeout=args.timeout)
            entry = (json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0
                     else {"case": CASES[index][0], "error": child.stderr[-2000:]})
        except subprocess.TimeoutExpired:
            entry = {"case": CASES[index][0], "error": f"hung: no result in {args.timeout} s"}
        results.append(entry)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cases": results}, f, indent=1)
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
