"""Summarise an Nsight Compute profile of the Hopper kernels (profile_hopper.py) as JSON.

    ncu -i prof.ncu-rep --page details --csv > details.csv
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv    (gzip it if you like)
    python benchmarks/ncu_summary.py details.csv source.csv.gz --out summary.json

Per kernel: duration and clocks, SM and memory throughput, the busiest pipeline (ncu's rule text), and
where the sampled warps stalled. The CTA has 12 warps of which 9 work (two consumer warpgroups and one
producer warp): the other 3 fill the producer's warpgroup and wait at a barrier for the whole kernel, so
their samples (a NOP waiting at a barrier) are reported apart and left out of the stall shares.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import json
import re

DETAILS = {("GPU Speed Of Light Throughput", "Duration"): "duration",
           ("GPU Speed Of Light Throughput", "SM Frequency"): "sm_frequency",
           ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "compute_throughput_pct",
           ("GPU Speed Of Light Throughput", "Memory Throughput"): "memory_throughput_pct",
           ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_throughput_pct",
           ("Memory Workload Analysis", "L2 Hit Rate"): "l2_hit_rate_pct",
           ("Compute Workload Analysis", "Issue Slots Busy"): "issue_slots_busy_pct",
           ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "warp_cycles_per_issued_instruction"}


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _open(path: str):
    return io.TextIOWrapper(gzip.open(path), encoding="utf-8") if path.endswith(".gz") else open(path)


def details(path: str) -> list[dict]:
    kernels: dict[str, dict] = {}
    with _open(path) as f:
        for row in csv.DictReader(f):
            k = kernels.setdefault(row["ID"], {"grid": row["Grid Size"], "block": row["Block Size"]})
            key = DETAILS.get((row["Section Name"], row["Metric Name"]))
            if key:
                unit = row["Metric Unit"]
                k[key if unit in ("%", "", "cycle") else f"{key}_{unit.lower()}"] = _number(row["Metric Value"])
            busiest = re.search(r"(\w+) is the highest-utilized pipeline \(([\d.]+)%\)", row["Rule Description"] or "")
            if busiest:
                k["busiest_pipeline"] = {"name": busiest[1], "utilization_pct": float(busiest[2]),
                                         "note": "ncu: 'Shared' is dominated by the tensor sub-pipeline here"}
    return list(kernels.values())


def stalls(path: str, top: int = 12) -> list[dict]:
    with _open(path) as f:
        rows = list(csv.reader(f))
    blocks, current = [], None
    for row in rows:
        if row and row[0] == "Kernel Name":
            current = []
            blocks.append(current)
        elif current is not None:
            current.append(row)
    summaries = []
    for block in blocks:
        header, data = block[0], [r for r in block[1:] if len(r) == len(block[0])]
        col = {h: i for i, h in enumerate(header)}
        reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
        total, idle = 0.0, 0.0
        by_reason, hot = collections.Counter(), []
        for r in data:
            samples = _number(r[col["Warp Stall Sampling (All Samples)"]])
            if not samples:
                continue
            total += samples
            source = r[col["Source"]].strip()
            if source == "NOP" and _number(r[col["stall_barrier"]]) >= 0.9 * samples:
                idle += samples
                continue
            for reason in reasons:
                by_reason[reason[len("stall_"):]] += _number(r[col[reason]])
            worst = max(reasons, key=lambda c: _number(r[col[c]]))
            hot.append((samples, source, worst[len("stall_"):], _number(r[col["Instructions Executed"]])))
        working = total - idle
        hot.sort(key=lambda h: -h[0])
        summaries.append({
            "samples": total, "idle_warp_share": idle / total,
            "stall_shares_working_warps": {k: v / working for k, v in by_reason.most_common()},
            "top_instructions": [{"share_working": s / working, "sass": src, "main_stall": why, "executed": int(ex)}
                                 for s, src, why, ex in hot[:top]]})
    return summaries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("details")
    ap.add_argument("source")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    kernels = [{**d, **s} for d, s in zip(details(args.details), stalls(args.source))]
    with open(args.out, "w") as f:
        json.dump({"kernels": kernels}, f, indent=1)
    for k in kernels:
        shares = ", ".join(f"{r} {v:.0%}" for r, v in list(k["stall_shares_working_warps"].items())[:5])
        print(f"grid {k['grid']}: {k.get('duration_ms', k.get('duration'))} ms at {k.get('sm_frequency_ghz')} GHz, "
              f"SM {k.get('compute_throughput_pct')}%, busiest {k.get('busiest_pipeline')}, idle warps "
              f"{k['idle_warp_share']:.0%}; working warps: {shares}")


if __name__ == "__main__":
    main()
