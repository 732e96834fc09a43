"""What the Hopper launches compute against the rule's useful work, and what a time target asks of them.

    python benchmarks/work_model.py --out work_model.json [--probe results/hopper/probe_chunks_r6.json]

CPU arithmetic, no GPU: for the paper config on Llama-3.1-8B's attention shape (bench_kernels.py's), count
the 128-row x 128-key tile products each launch of hopper_delta.py issues (its work items, key segments and
key chunks, restated here as a model: hopper_delta.py and triton_delta.py are the kernels' arithmetic) and
set them against DeltaPlan.attended_keys, the useful work every TFLOP/s in BENCHMARKS.md counts. With a
probe's per-launch times (each launch alone, one process; the probe is in git at commit b1cc899) it gives each
launch's rate on the tiles it issues, and the rate on issued tiles a time target would need.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_kernels import D, GAMMA, HKV, HQ, SINK, WINDOW, key_flops
from deltapass.kernels import DeltaPlan
from deltapass.kernels.hopper_delta import CTA_M, default_key_chunk
from record import header

BLOCK_N = 128     # both launches' key tile (dispatch.py's Hopper defaults)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sparse_tiles(pmin: int, pmax: int, sink: int, window: int, block_n: int = BLOCK_N) -> int:
    """Key tiles of one item over rows pmin..pmax: the sink segment, then the window segment (the count of
    triton_delta._key_tiles over _sparse_segments; tests/test_kernels.py holds the two equal)."""
    a_hi = min(sink, pmax + 1)
    b_lo, b_hi = max(sink, pmin - window + 1), pmax + 1
    n_b = cdiv(b_hi - b_lo // block_n * block_n, block_n) if b_hi > b_lo else 0
    return cdiv(a_hi, block_n) + n_b


def chunk_tiles(pmax: int, chunk: int, block_n: int = BLOCK_N) -> list[int]:
    """Key tiles of each non-empty key chunk of dense rows up to pmax (_key_tiles over _causal_chunk_segments)."""
    return [cdiv(min(lo + chunk, pmax + 1) - lo, block_n) for lo in range(0, pmax + 1, chunk)]


def issued_tiles(plan: DeltaPlan, group: int) -> dict:
    """Tile products per K/V head of each launch, and its work items (a tile packs 128 // group positions)."""
    per = CTA_M.value // group
    sparse_rows, dense_rows = plan.sparse_kernel_rows, plan.dense_kernel_rows
    sparse = sum(sparse_tiles(min(j * per, sparse_rows - 1), min(j * per + per - 1, sparse_rows - 1),
                              plan.sparse_kernel_sink, plan.sparse_kernel_window)
                 for j in range(cdiv(sparse_rows * group, CTA_M.value)))
    chunk = default_key_chunk(plan.n, BLOCK_N)
    dense = resparse = items = 0
    last_sample = (plan.n_samples - 1) * plan.gamma
    for j in range(cdiv(dense_rows * group, CTA_M.value)):
        first, last = min(j * per, dense_rows - 1), min(j * per + per - 1, dense_rows - 1)
        pmin, pmax = (int(plan.dense_row_position(torch.tensor(r))) for r in (first, last))
        tiles = chunk_tiles(pmax, chunk)
        dense += sum(tiles)
        items += len(tiles)
        if plan.carries_delta and first < plan.n_samples:    # the sample rows' sparse part, in the last chunk
            resparse += sparse_tiles(pmin, min(pmax, last_sample), plan.sink, plan.window)
    return {"sparse_tiles": sparse, "sparse_items": cdiv(sparse_rows * group, CTA_M.value),
            "dense_tiles": dense, "dense_resparse_tiles": resparse, "dense_items": items, "key_chunk": chunk}


def tile_flops(tiles: float) -> float:
    """FLOPs of `tiles` 128 x 128 tile products (QK^T and PV) on every K/V head."""
    return 4.0 * D * CTA_M.value * BLOCK_N * tiles * HKV


def model(n: int, probe: dict) -> dict:
    plan = DeltaPlan(n, SINK, WINDOW, GAMMA, "delta")
    tiles = issued_tiles(plan, HQ // HKV)
    sparse_keys, dense_keys = plan.attended_keys()
    useful = key_flops(sparse_keys + dense_keys)
    issued = {"sparse rows + delta": tile_flops(tiles["sparse_tiles"]),
              "dense rows": tile_flops(tiles["dense_tiles"] + tiles["dense_resparse_tiles"])}
    row = {"n": n, **tiles, "useful_tflop": useful / 1e12,
           "issued_tflop": {k: v / 1e12 for k, v in issued.items()},
           "useful_share_of_issued": useful / sum(issued.values())}
    times = {t["name"].split(" [")[0]: t["ms"] for t in probe.get("timings", [])
             if t["n"] == n and t["name"].endswith("[shipped]")}
    if times:
        row["probe_ms"] = times
        row["tflops_on_issued_tiles"] = {k: issued[k] / times[k] / 1e9 for k in issued if k in times}
        row["useful_tflops_both_launches"] = useful / times["delta"] / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", default=str(Path(__file__).resolve().parent / "results/hopper/probe_chunks_r6.json"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--targets-ms", type=float, nargs="*", default=[15.0], help="time targets at the first size")
    args = ap.parse_args()
    with open(args.probe) as f:
        probe = json.load(f)
    rows = [model(n, probe) for n in args.sizes]
    first = rows[0]
    for target in args.targets_ms:
        first.setdefault("targets", []).append({
            "ms": target, "useful_tflops": first["useful_tflop"] / target * 1e3,
            "tflops_on_issued_tiles": sum(first["issued_tflop"].values()) / target * 1e3})
    result = {"meta": header("cpu", probe=args.probe, shape={"Hq": HQ, "Hkv": HKV, "D": D},
                             config={"sink": SINK, "window": WINDOW, "gamma": GAMMA}, block_n=BLOCK_N), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(f"N={r['n']}: useful {r['useful_tflop']:.2f} TFLOP, issued "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["issued_tflop"].items())
              + f" (useful share {r['useful_share_of_issued']:.3f})")
        for k, v in r.get("tflops_on_issued_tiles", {}).items():
            print(f"  {k}: {r['probe_ms'][k]:.2f} ms, {v:.0f} TFLOP/s on issued tiles")
        for t in r.get("targets", []):
            print(f"  {t['ms']} ms needs {t['useful_tflops']:.0f} useful TFLOP/s = {t['tflops_on_issued_tiles']:.0f} "
                  "on issued tiles")


if __name__ == "__main__":
    main()
