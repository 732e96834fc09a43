"""The Hopper (Gluon, warp-specialized) Δ kernels on one H200: correctness, then speed, in one run.

    python benchmarks/bench_hopper.py --out hopper.json          # README's 32K and 128K rows
    python benchmarks/bench_hopper.py --out hopper.json --variants schedules --skip   # every schedule, every baseline

Correctness: every variant runs into NaN-poisoned outputs (and delta buffer) and is compared with the
float64 reference of the rule; the bar is check_kernels_gpu's (kernel max error <= 2x PyTorch's in the same
dtype, on all rows and on the rule's exact rows). Speed: Llama-3.1-8B attention (B=1, Hq=32, Hkv=8, D=128),
bf16, paper config, medians of warm runs; the Triton kernels, FlexAttention Δ and cuDNN dense in the same
process. TFLOP/s count the rule's useful work (DeltaPlan.attended_keys).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton

from bench_kernels import GAMMA, SINK, WINDOW, delta_flops, dense_flops, flex_delta, inputs, sdpa_dense
from check_kernels_gpu import bar_result, max_err
from deltapass.kernels import CORRECTIONS, DeltaPlan, LaunchConfig, reference_delta_attention
from deltapass.kernels.dispatch import HOPPER_SCHEDULE
from deltapass.kernels.hopper_delta import launch_hopper_delta_attention
from deltapass.kernels.triton_delta import launch_delta_attention
from record import header

# (N, Hq, Hkv, D, sink, window, gamma, dtypes, corrections)
CHECKS = [
    (4099, 9, 3, 64, 64, 256, 64, ("bfloat16",), CORRECTIONS),
    (8192, 32, 8, 128, 1024, 2048, 64, ("bfloat16", "float16"), CORRECTIONS),
    (3001, 8, 8, 128, 17, 300, 48, ("bfloat16",), ("delta", "none")),
    (2049, 16, 2, 128, 0, 400, 32, ("bfloat16",), ("delta",)),
    (1000, 4, 2, 128, 64, 2048, 64, ("bfloat16",), ("delta",)),     # N <= sink + window: exact
]
# Named sets of launcher keywords of launch_hopper_delta_attention; "shipped" is what dispatch.py passes.
VARIANT_SETS = {"shipped": {"shipped": dict(HOPPER_SCHEDULE)},
                "schedules": {"shipped": dict(HOPPER_SCHEDULE),
                              "one CTA per item": {**HOPPER_SCHEDULE, "persistent_q": False},
                              "no ping-pong": {**HOPPER_SCHEDULE, "pingpong": False}}}


def run_hopper(q, k, v, plan, variant, out=None, delta=None):
    """The Hopper launcher with the variant's keywords; {"triton": true} runs the Triton kernels instead.

    {"shared_kv": true} is a diagnostic, not a kernel: every K/V head reads head 0's keys and values (one
    head's worth of K/V traffic), so its time against the same variant without it bounds what memory costs.
    """
    out = torch.empty_like(q) if out is None else out
    scale = 1 / math.sqrt(q.shape[-1])
    variant = dict(variant)
    if variant.pop("shared_kv", False):
        k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    if variant.get("triton"):
        return launch_delta_attention(q, k, v, out, plan, scale, LaunchConfig().resolved(q.shape[-1], q.device), delta)
    return launch_hopper_delta_attention(q, k, v, out, plan, scale, delta, **variant)


def check_case(case, variants) -> list[dict]:
    n, hq, hkv, d, sink, window, gamma, dtypes, corrections = case
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + d)
    base = [torch.randn(1, h, n, d, device="cuda", dtype=torch.float64, generator=gen) for h in (hq, hkv, hkv)]
    results = []
    for dtype in dtypes:
        q, k, v = (t.to(getattr(torch, dtype)) for t in base)
        for correction in corrections:
            kw = dict(sink=sink, window=window, gamma=gamma, correction=correction)
            plan = DeltaPlan(n, **kw)
            truth = reference_delta_attention(*base, **kw)
            torch_low = reference_delta_attention(q, k, v, **kw)
            rows = torch.arange(n, device="cuda") if plan.exact else plan.dense_row_positions("cuda")
            for name, variant in variants.items():
                out = torch.full_like(q, float("nan"))
                delta = torch.full((1, hq, max(plan.n_samples, 1), d), float("nan"), device="cuda")
                run_hopper(q, k, v, plan, variant, out, delta)
                torch.cuda.synchronize()
                res = {"n": n, "hq": hq, "hkv": hkv, "d": d, "dtype": dtype, "variant": name}
                res = bar_result({**res, "check": "rule", "correction": correction}, out, truth, torch_low)
                if rows.numel():
                    res["kernel_exact_rows_max"] = max_err(out[:, :, rows], truth[:, :, rows])
                    res["torch_exact_rows_max"] = max_err(torch_low[:, :, rows], truth[:, :, rows])
                    res["pass"] = res["pass"] and res["kernel_exact_rows_max"] <= 2 * res["torch_exact_rows_max"]
                results.append(res)
                print(json.dumps(res), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--variants", default="shipped",
                    help=f"a named set ({', '.join(VARIANT_SETS)}) or a JSON object: name -> launcher keywords")
    ap.add_argument("--check-variants", nargs="*", default=None,
                    help="variants to check (default: all; the option alone: none)")
    ap.add_argument("--modes", nargs="+", default=["delta"])
    ap.add_argument("--skip", nargs="*", default=["triton"],
                    help="baselines to skip: cudnn flex triton (default: triton; the option alone: none)")
    args = ap.parse_args()
    variants = VARIANT_SETS[args.variants] if args.variants in VARIANT_SETS else json.loads(args.variants)
    checked = {k: v for k, v in variants.items() if args.check_variants is None or k in args.check_variants}
    result = {"meta": header(variants=variants, config={"sink": SINK, "window": WINDOW, "gamma": GAMMA}),
              "checks": [], "timings": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    t0 = time.time()
    for case in CHECKS if checked else []:
        result["checks"] += check_case(case, checked)
        save()
    print(f"checks: {time.time() - t0:.0f} s", flush=True)

    for n in args.sizes:
        q, k, v = inputs(n)
        rows = []
        if "cudnn" not in args.skip:
            from torch.nn.attention import SDPBackend
            rows.append(("cuDNN SDPA (dense)", sdpa_dense(SDPBackend.CUDNN_ATTENTION)(q, k, v), dense_flops(n)))
        if "flex" not in args.skip:
            rows.append(("FlexAttention Δ", flex_delta(q, k, v), delta_flops(n)))
        for mode in args.modes:
            plan = DeltaPlan(n, SINK, WINDOW, GAMMA, mode)
            if "triton" not in args.skip:
                launch = LaunchConfig().resolved(128, q.device)
                rows.append((f"triton {mode}", lambda plan=plan, launch=launch: launch_delta_attention(
                    q, k, v, torch.empty_like(q), plan, 1 / math.sqrt(128), launch), delta_flops(n, mode)))
            for name, variant in variants.items():
                rows.append((f"hopper {mode} [{name}]", lambda plan=plan, variant=variant: run_hopper(
                    q, k, v, plan, variant), delta_flops(n, mode)))
        for name, fn, flops in rows:
            try:
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                entry = {"n": n, "name": name, "ms": ms, "tflops": flops / ms / 1e9}
            except Exception as exc:  # record and go on: one broken variant must not hide the others
                entry = {"n": n, "name": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            result["timings"].append(entry)
            print(json.dumps(entry), flush=True)
            save()
        del q, k, v
        torch.cuda.empty_cache()

    print(f"\n{'N':>7} {'name':<44} {'ms':>8} {'TFLOP/s':>8} {'x Flex':>7} {'x cuDNN':>8} {'x triton':>8}")
    for n in args.sizes:
        here = {t["name"]: t for t in result["timings"] if t["n"] == n and "ms" in t}
        flex, cudnn = here.get("FlexAttention Δ"), here.get("cuDNN SDPA (dense)")
        for name, t in here.items():
            tri = here.get(f"triton {name.split()[1]}") if name.startswith("hopper") else None
            t["x_flex"] = flex["ms"] / t["ms"] if flex else None
            t["x_cudnn"] = cudnn["ms"] / t["ms"] if cudnn else None
            t["x_triton"] = tri["ms"] / t["ms"] if tri else None
            print(f"{n:>7} {name[:44]:<44} {t['ms']:>8.3f} {t['tflops']:>8.0f} {t['x_flex'] or math.nan:>7.2f} "
                  f"{t['x_cudnn'] or math.nan:>8.2f} {t['x_triton'] or math.nan:>8.2f}")
    for t in result["timings"]:
        if "error" in t:
            print("ERROR", t["n"], t["name"], t["error"][:300])
    save()
    failed = [c for c in result["checks"] if not c["pass"]]
    print(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} pass")
    for c in failed[:20]:
        print("FAIL", {k: c[k] for k in ("n", "hq", "hkv", "d", "dtype", "variant", "correction", "nan",
                                        "kernel_max", "torch_max")})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
