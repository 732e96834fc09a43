"""Where the Hopper Δ kernels' time goes: each launch timed alone, and two diagnostics, in one run.

    python benchmarks/probe_hopper_launches.py --out probe.json [--sizes 131072 1048576] [--variants '{...}']

Timed (B=1, Hq=32, Hkv=8, D=128, bf16, paper config; medians of warm runs, one process):
  * "delta [variant]": both launches with the variant's launcher keywords ("shipped": dispatch.py's);
  * "dense rows [variant]": the dense-rows launch alone; "sparse rows + delta [variant]": the sparse launch
    alone, adding the delta rows the dense launch left;
  * "dense rows, L2-hot keys" (diagnostic, wrong results; --no-l2-hot skips it): the producer loads key
    tile (start mod 1024), so every K/V read hits L2; its time against "dense rows" bounds what the dense
    rows' DRAM traffic costs;
  * "none, window W" for each of --windows (none skips them): the sparse launch of the plan without
    correction, against its key tiles per CTA; the least-squares line splits its time into a cost per key
    tile and a fixed cost per CTA (prologue, epilogue).
Diagnostics run a copy of hopper_delta.py with one line replaced (written next to it, imported, removed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os

import torch
import triton

from bench_hopper import DEFAULT_VARIANTS
from bench_kernels import D, GAMMA, HKV, HQ, SINK, WINDOW, delta_flops, inputs, key_flops
from deltapass.kernels import DeltaPlan, hopper_delta
from work_model import issued_tiles

SHIPPED = DEFAULT_VARIANTS["shipped"]
# (old, new): the producer's two TMA loads, redirected to one of the head's first 8 key tiles.
L2_HOT = (("_tma_load(k_desc, [batch, kv_head, start, 0]", "_tma_load(k_desc, [batch, kv_head, start % 1024, 0]"),
          ("_tma_load(v_desc, [batch, kv_head, start, 0]", "_tma_load(v_desc, [batch, kv_head, start % 1024, 0]"))


class OneLaunch:
    """The plan with one of its two launches emptied (the launcher skips a launch of 0 rows)."""

    def __init__(self, plan: DeltaPlan, keep: str):
        self._plan, self._keep = plan, keep

    @property
    def dense_kernel_rows(self):
        return self._plan.dense_kernel_rows if self._keep == "dense" else 0

    @property
    def sparse_kernel_rows(self):
        return self._plan.sparse_kernel_rows if self._keep == "sparse" else 0

    def __getattr__(self, name):
        return getattr(self._plan, name)


def each_launch(module, kw: dict, q, k, v, out, plan: DeltaPlan, scale: float, delta) -> list:
    """(name, call, useful FLOPs) of both launches ("delta") and of each alone, through `module`'s launcher
    (hopper_delta or a patched copy) with launcher keywords kw."""
    sparse_keys, dense_keys = plan.attended_keys()
    return [(name, lambda p=p: module.launch_hopper_delta_attention(q, k, v, out, p, scale, delta, **kw), flops)
            for name, p, flops in (("delta", plan, delta_flops(q.shape[2])),
                                   ("dense rows", OneLaunch(plan, "dense"), key_flops(dense_keys)),
                                   ("sparse rows + delta", OneLaunch(plan, "sparse"), key_flops(sparse_keys)))]


def patched_module(name: str, edits: tuple[tuple[str, str], ...]):
    """hopper_delta.py with each (old, new) of `edits` replaced once, imported as deltapass.kernels.<name>."""
    src = open(hopper_delta.__file__).read()
    for old, new in edits:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    path = os.path.join(os.path.dirname(hopper_delta.__file__), f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    return importlib.import_module(f"deltapass.kernels.{name}"), path


def tiles_per_cta(n: int, sink: int, window: int, group: int = HQ // HKV) -> float:
    """Key tiles an average sparse CTA loads (128 pairs = 128 / group positions), by work_model.py's count."""
    tiles = issued_tiles(DeltaPlan(n, sink, window, GAMMA, "none"), group)
    return tiles["sparse_tiles"] / tiles["sparse_items"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[131072])
    ap.add_argument("--windows", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--variants", default=json.dumps({"shipped": SHIPPED}), help="launcher keywords by name")
    ap.add_argument("--l2-hot", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    variants = json.loads(args.variants)
    scale = 1 / math.sqrt(D)
    hot, hot_path = patched_module("_probe_l2_hot", L2_HOT) if args.l2_hot else (None, None)
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "shape": [1, HQ, HKV, D], "variants": variants,
                       "config": {"sink": SINK, "window": WINDOW, "gamma": GAMMA}}, "timings": []}
    try:
        for n in args.sizes:
            q, k, v = inputs(n)
            out = torch.empty_like(q)
            plan = DeltaPlan(n, SINK, WINDOW, GAMMA, "delta")
            delta = torch.empty(1, HQ, plan.n_samples, D, device="cuda", dtype=torch.float32)
            hopper_delta.launch_hopper_delta_attention(q, k, v, out, plan, scale, delta, **SHIPPED)
            sparse_keys, dense_keys = plan.attended_keys()
            rows = []
            for name, kw in variants.items():
                rows += [(f"{launch} [{name}]", fn, flops, {})
                         for launch, fn, flops in each_launch(hopper_delta, kw, q, k, v, out, plan, scale, delta)]
            if args.l2_hot:
                rows.append(("dense rows, L2-hot keys", lambda: hot.launch_hopper_delta_attention(
                    q, k, v, torch.empty_like(q), OneLaunch(plan, "dense"), scale, torch.empty_like(delta),
                    **SHIPPED), key_flops(dense_keys), {}))
            for window in args.windows:
                none = DeltaPlan(n, SINK, window, GAMMA, "none")
                rows.append((f"none, window {window}", lambda none=none: hopper_delta.launch_hopper_delta_attention(
                    q, k, v, out, none, scale, **SHIPPED), key_flops(none.attended_keys()[0]),
                    {"window": window, "tiles_per_cta": tiles_per_cta(n, SINK, window),
                     "ctas": triton.cdiv(none.sparse_kernel_rows * (HQ // HKV), 128) * HKV}))
            for name, fn, flops, extra in rows:
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
                entry = {"n": n, "name": name, "ms": ms, "tflops": flops / ms / 1e9, **extra}
                result["timings"].append(entry)
                print(json.dumps(entry), flush=True)
            fit = [t for t in result["timings"] if t["n"] == n and "tiles_per_cta" in t]
            if len(fit) >= 2:
                # ms = ctas * (per_tile * tiles + per_cta) / SMs: fit ms / ctas against tiles per CTA.
                xs = torch.tensor([t["tiles_per_cta"] for t in fit], dtype=torch.float64)
                ys = torch.tensor([t["ms"] / t["ctas"] for t in fit], dtype=torch.float64)
                a = torch.stack([xs, torch.ones_like(xs)], 1)
                slope, icpt = torch.linalg.lstsq(a, ys[:, None]).solution[:, 0].tolist()
                shipped_tiles = tiles_per_cta(n, SINK, WINDOW)
                result.setdefault("fits", []).append({
                    "n": n, "ms_per_cta_per_tile": slope, "ms_per_cta_fixed": icpt,
                    "fixed_share_at_paper_window": icpt / (icpt + slope * shipped_tiles),
                    "paper_window_tiles_per_cta": shipped_tiles})
            del q, k, v, out, delta
            torch.cuda.empty_cache()
    finally:
        if hot_path:
            os.remove(hot_path)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'N':>8} {'launch':<36} {'ms':>9} {'TFLOP/s':>8}")
    for t in result["timings"]:
        print(f"{t['n']:>8} {t['name'][:36]:<36} {t['ms']:>9.3f} {t['tflops']:>8.0f}")
    for f in result.get("fits", []):
        print(f"N {f['n']}: fixed share of a sparse CTA at the paper window {f['fixed_share_at_paper_window']:.1%} "
              f"({f['paper_window_tiles_per_cta']:.1f} tiles)")


if __name__ == "__main__":
    main()
