"""What the layout a compiled model hands the Δ op costs: q, k, v as transposed [B, N, H, D] views.

    python benchmarks/probe_layouts.py --out layouts.json [--sizes 32768 131072]

Llama-3.1-8B attention shape (bench_kernels.py's), bf16, paper config, the op as dispatch runs it; one
process, do_bench medians:
  * "contiguous": contiguous [B, H, N, D] inputs, as the kernel tables time them;
  * "model layout, in place": the same values as transposed views of [B, N, H, D] tensors (what the
    projections and RoPE of a compiled transformers model give the op); the kernels read them where they
    are and write the output in [B, N, H, D] order;
  * "model layout, copied": what revision 6 of the op cost on that layout: q, k and v copied to
    contiguous tensors first, and the contiguous output copied back to [B, N, H, D] order (the model's
    transpose and reshape to [B, N, H * D]).
The three outputs must hold the same bits.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from bench_kernels import GAMMA, SINK, WINDOW, inputs
from deltapass.kernels import delta_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args()
    rule = dict(sink=SINK, window=WINDOW, gamma=GAMMA, correction="delta")
    rows = []
    for n in args.sizes:
        q, k, v = inputs(n)
        qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        variants = {"contiguous": lambda: delta_attention(q, k, v, **rule),
                    "model layout, in place": lambda: delta_attention(qt, kt, vt, **rule),
                    "model layout, copied": lambda: delta_attention(
                        qt.contiguous(), kt.contiguous(), vt.contiguous(), **rule).transpose(1, 2).contiguous()}
        outs = {name: fn() for name, fn in variants.items()}
        outs["model layout, copied"] = outs["model layout, copied"].transpose(1, 2)
        same = all(torch.equal(o, outs["contiguous"]) for o in outs.values())
        in_place_order = outs["model layout, in place"].stride() == qt.stride()
        for name, fn in variants.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            rows.append({"n": n, "variant": name, "ms": ms, "bitwise_equal": same,
                         "in_place_output_in_q_order": in_place_order})
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v, qt, kt, vt, outs
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "config": rule, "rows": rows}, f, indent=1)
    print(f"\n{'N':>7} {'variant':<24} {'ms':>8} {'x in place':>10}  same bits")
    for r in rows:
        base = next(x["ms"] for x in rows if x["n"] == r["n"] and x["variant"] == "model layout, in place")
        print(f"{r['n']:>7} {r['variant']:<24} {r['ms']:>8.2f} {r['ms'] / base:>10.3f}  {r['bitwise_equal']}")
    if not all(r["bitwise_equal"] and r["in_place_output_in_q_order"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
