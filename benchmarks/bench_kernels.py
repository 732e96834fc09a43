"""Δ-attention kernels vs cuDNN SDPA, SDPA flash (FA2) and FlexAttention Δ, in one run on one GPU.

    python benchmarks/bench_kernels.py --out results.json [--sizes 32768 131072 1048576]

Shape: Llama-3.1-8B attention (benchmarks/shapes.py: B=1, Hq=32, Hkv=8, D=128), bf16, causal prefill,
paper config (deltapass.presets.PAPER: sink 1024, window 2048, gamma 64). Times are medians of warm runs
(triton.testing.do_bench); the dense baselines at >= 512K are single timed runs
after a warm-up at a smaller size (each takes tens of seconds). Also checks the
bf16 kernels against the float64 reference of the rule.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from deltapass.kernels import DeltaPlan, LaunchConfig, delta_attention, reference_delta_attention
from deltapass.kernels.dispatch import hopper_reason
from deltapass.kernels.rule import sparse_keep
from deltapass.presets import PAPER
from record import header
from shapes import MODELS

SHAPE = MODELS["llama-3.1-8b"].attention
B, HQ, HKV, D = SHAPE.batch, SHAPE.q_heads, SHAPE.kv_heads, SHAPE.head_dim
SINK, WINDOW, GAMMA = PAPER.sink, PAPER.window, PAPER.gamma


def inputs(n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def key_flops(keys: float) -> float:
    """Useful FLOPs of `keys` (query row, key) pairs per head: QK^T and PV, 2 * D each, every head and batch."""
    return 4.0 * D * HQ * B * keys


def delta_flops(n: int, correction: str = "delta") -> float:
    return key_flops(sum(DeltaPlan(n, SINK, WINDOW, GAMMA, correction).attended_keys()))


def dense_flops(n: int) -> float:
    return key_flops(n * (n + 1) / 2)


def bench(fn, single: bool = False) -> float:
    """Median ms of warm runs; one timed run after one warm call when single."""
    if single:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


# ---- baselines -------------------------------------------------------------------------------

def sdpa_dense(backend):
    def make(q, k, v):
        group = HQ // HKV
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return run
    return make


def flex_delta(q, k, v):
    """The same Δ rule composed from FlexAttention: sliding-window mask + strided-query mask + add."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    n = q.shape[2]
    plan = DeltaPlan(n, SINK, WINDOW, GAMMA, "delta")
    positions = plan.dense_row_positions("cuda").to(torch.int32)
    s_p, n_samples = plan.sparse_end, plan.n_samples

    def sparse_mod(b, h, qi, ki):
        return sparse_keep(qi, ki, SINK, WINDOW)

    def dense_mod(b, h, qi, ki):
        return ki <= positions[qi]

    sparse_mask = create_block_mask(sparse_mod, None, None, n, n, device="cuda", _compile=True)
    dense_mask = create_block_mask(dense_mod, None, None, positions.numel(), n, device="cuda", _compile=True)
    block = torch.arange(s_p, device="cuda") // GAMMA

    def run():
        out = flex(q, k, v, block_mask=sparse_mask, enable_gqa=True)
        dense = flex(q[:, :, positions], k, v, block_mask=dense_mask, enable_gqa=True)
        delta = dense[:, :, :n_samples] - out[:, :, positions[:n_samples]]
        out[:, :, :s_p] += delta[:, :, block]
        out[:, :, positions] = dense
        return out
    return run


def ours(launch: LaunchConfig, correction: str = "delta"):
    def make(q, k, v):
        kw = {k_: v_ for k_, v_ in launch.to_dict().items() if v_}
        return lambda: delta_attention(q, k, v, sink=SINK, window=WINDOW, gamma=GAMMA,
                                       correction=correction, **kw)
    return make


# ---- correctness -----------------------------------------------------------------------------

def check(n: int, variants: list, correction: str) -> list[dict]:
    """bf16 kernels (every launch variant) vs the float64 reference; PyTorch's bf16 run of the rule as the bar."""
    q, k, v = inputs(n, seed=n + 1)
    kw = dict(sink=SINK, window=WINDOW, gamma=GAMMA, correction=correction)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kw)
    torch_bf16 = reference_delta_attention(q, k, v, **kw)
    plan = DeltaPlan(n, SINK, WINDOW, GAMMA, correction)
    rows = plan.dense_row_positions("cuda") if not plan.exact else torch.arange(n, device="cuda")

    def errs(x, sel=None):
        x, t = (x, truth) if sel is None else (x[:, :, sel], truth[:, :, sel])
        diff = (x.double() - t)
        return {"rel": (diff.norm() / t.norm()).item(), "max_abs": diff.abs().max().item()}

    bar_all, bar_rows = errs(torch_bf16), errs(torch_bf16, rows)
    results = []
    for name, launch in variants:
        out = ours(launch, correction)(q, k, v)()
        res = {"n": n, "correction": correction, "launch": name, "nan": bool(out.isnan().any()),
               "kernel_all": errs(out), "torch_bf16_all": bar_all,
               "kernel_exact_rows": errs(out, rows), "torch_bf16_exact_rows": bar_rows}
        res["pass"] = (not res["nan"]
                       and res["kernel_exact_rows"]["max_abs"] <= 2 * bar_rows["max_abs"]
                       and res["kernel_all"]["max_abs"] <= 2 * bar_all["max_abs"])
        results.append(res)
    del truth, torch_bf16
    torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--check-sizes", type=int, nargs="*", default=[8192, 131072])
    ap.add_argument("--variants", type=str, default="[]",
                    help="JSON list of extra LaunchConfig dicts to time besides the defaults")
    ap.add_argument("--modes", nargs="+", default=["delta", "recompute", "none"])
    ap.add_argument("--skip", nargs="*", default=[], help="baselines to skip: cudnn fa2 flex")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    default = LaunchConfig()
    variants = [("default", default)] + [(json.dumps(d, sort_keys=True), LaunchConfig(**d))
                                         for d in json.loads(args.variants)]
    meta = header(shape={"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16"},
                  config={"sink": SINK, "window": WINDOW, "gamma": GAMMA},
                  resolved_default_launch=default.resolved(D, torch.device("cuda")).to_dict(),
                  resolved_default_launch_hopper=default.resolved(D, torch.device("cuda"), hopper=True).to_dict(),
                  default_kernels="hopper" if not hopper_reason(*inputs(1024), default) else "triton")
    result = {"meta": meta, "checks": [], "timings": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for n in args.check_sizes:
        for correction in ("delta", "recompute"):
            t0 = time.time()
            result["checks"].extend(check(n, variants, correction))
            print(f"check N={n} {correction}: {result['checks'][-len(variants):]} ({time.time() - t0:.1f}s)",
                  flush=True)
            save()

    # The tensor cores' reach on this GPU today: a large bf16 GEMM, in the same process.
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    meta["bf16_gemm_8192_tflops"] = 2 * 8192 ** 3 / bench(lambda: a @ b) / 1e9
    print(f"bf16 GEMM 8192^3: {meta['bf16_gemm_8192_tflops']:.0f} TFLOP/s", flush=True)
    del a, b

    for n in args.sizes:
        q, k, v = inputs(n)
        single = n >= 524288
        rows = []
        if "cudnn" not in args.skip:
            rows.append(("cuDNN SDPA (dense)", sdpa_dense(SDPBackend.CUDNN_ATTENTION), dense_flops(n), single))
        if "fa2" not in args.skip:
            rows.append(("SDPA flash / FA2 (dense)", sdpa_dense(SDPBackend.FLASH_ATTENTION), dense_flops(n), single))
        if "flex" not in args.skip:
            rows.append(("FlexAttention Δ", flex_delta, delta_flops(n), False))
        for mode in args.modes:
            for name, launch in variants:
                rows.append((f"deltapass {mode} [{name}]", ours(launch, mode), delta_flops(n, mode), False))
        for name, make, flops, one in rows:
            try:
                fn = make(q, k, v)
                ms = bench(fn, single=one)
                entry = {"n": n, "name": name, "ms": ms, "flops": flops, "tflops": flops / ms / 1e9,
                         "single_run": one}
            except Exception as exc:  # out of memory, unsupported backend: record and go on
                entry = {"n": n, "name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            result["timings"].append(entry)
            print(json.dumps(entry), flush=True)
            save()
            torch.cuda.empty_cache()
        del q, k, v
        torch.cuda.empty_cache()

    # Ratios against the baselines of the same run.
    print(f"\n{'N':>8} {'name':<48} {'ms':>10} {'TFLOP/s':>8} {'x cuDNN':>8} {'x Flex':>8}")
    for n in args.sizes:
        here = [t for t in result["timings"] if t["n"] == n and "ms" in t]
        base = {t["name"]: t["ms"] for t in here}
        for t in here:
            cud = base.get("cuDNN SDPA (dense)")
            flx = base.get("FlexAttention Δ")
            t["x_cudnn"] = cud / t["ms"] if cud else None
            t["x_flex"] = flx / t["ms"] if flx else None
            print(f"{n:>8} {t['name'][:48]:<48} {t['ms']:>10.2f} {t['tflops']:>8.0f} "
                  f"{t['x_cudnn'] or float('nan'):>8.2f} {t['x_flex'] or float('nan'):>8.2f}")
    save()
    for c in result["checks"]:
        print(f"check N={c['n']} {c['correction']} [{c['launch'][:40]}]: pass={c['pass']} rel={c['kernel_all']['rel']:.2e} "
              f"exact-rows max={c['kernel_exact_rows']['max_abs']:.2e} "
              f"(torch bf16 {c['torch_bf16_exact_rows']['max_abs']:.2e})")
    sys.exit(0 if all(c["pass"] for c in result["checks"]) else 1)


if __name__ == "__main__":
    main()
