"""GPU correctness sweep of the Δ kernels: every head dim, fp16 and bf16, GQA ratios, odd N, every mode.

    python benchmarks/check_kernels_gpu.py --out checks.json

Each case runs the Triton kernels into NaN-poisoned outputs and compares with the float64 reference
of the rule; the bar is PyTorch computing the same rule in the same low precision (kernel max error
<= 2x PyTorch's, on all rows and on the rule's exact rows).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from deltapass.kernels import DeltaPlan, LaunchConfig, reference_delta_attention
from deltapass.kernels.triton_delta import launch_delta_attention

# (N, Hq, Hkv, D, sink, window, gamma)
CASES = [
    (4099, 9, 3, 64, 64, 256, 64),
    (3001, 8, 8, 80, 17, 300, 48),
    (2500, 12, 4, 96, 0, 500, 100),
    (8192, 32, 8, 128, 1024, 2048, 64),
    (2049, 8, 1, 256, 100, 400, 32),
    (1000, 4, 2, 128, 64, 2048, 64),      # N <= sink + window: exact
]


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = []
    for n, hq, hkv, d, sink, window, gamma in CASES:
        gen = torch.Generator(device="cuda").manual_seed(n + d)
        base = [torch.randn(1, h, n, d, device="cuda", dtype=torch.float64, generator=gen) for h in (hq, hkv, hkv)]
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(dtype) for t in base)
            for correction in ("delta", "recompute", "none"):
                kw = dict(sink=sink, window=window, gamma=gamma, correction=correction)
                plan = DeltaPlan(n, sink, window, gamma, correction)
                out = torch.full_like(q, float("nan"))
                delta = torch.full((1, hq, max(plan.n_samples, 1), d), float("nan"), device="cuda")
                launch = LaunchConfig().resolved(d, q.device)
                launch_delta_attention(q, k, v, out, plan, 1 / math.sqrt(d), launch, delta=delta)
                truth = reference_delta_attention(*(t.double() for t in (q, k, v)), **kw)
                torch_low = reference_delta_attention(q, k, v, **kw)
                rows = torch.arange(n, device="cuda") if plan.exact else plan.dense_row_positions("cuda")
                res = {"n": n, "hq": hq, "hkv": hkv, "d": d, "dtype": str(dtype), "correction": correction,
                       "nan": bool(out.isnan().any()), "kernel_max": max_err(out, truth),
                       "torch_max": max_err(torch_low, truth)}
                if rows.numel():
                    res["kernel_exact_rows_max"] = max_err(out[:, :, rows], truth[:, :, rows])
                    res["torch_exact_rows_max"] = max_err(torch_low[:, :, rows], truth[:, :, rows])
                res["pass"] = (not res["nan"] and res["kernel_max"] <= 2 * res["torch_max"]
                               and res.get("kernel_exact_rows_max", 0) <= 2 * res.get("torch_exact_rows_max", 0))
                results.append(res)
                print(json.dumps(res), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": results}, f, indent=1)
    failed = [r for r in results if not r["pass"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} cases pass")
    for r in failed:
        print("FAIL", r)


if __name__ == "__main__":
    main()
