"""deltapass.kernels.delta_attention on tensors: agreement with the exact rule, and time vs dense SDPA.

    python examples/kernel_demo.py [--n 4096] [--device cuda]

Shapes default to SmolLM2-135M's attention (9 query heads over 3 K/V heads, head dim 64).
On a GPU the Triton kernels run; on CPU the exact PyTorch path runs (or the Triton kernels
under TRITON_INTERPRET=1). Random tensors say nothing about accuracy on a model: how far each
correction stays from dense attention is measured on a real model, not here.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from deltapass.kernels import CORRECTIONS, delta_attention, reference_delta_attention


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="sequence length")
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--gamma", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape_q = (1, args.q_heads, args.n, args.head_dim)
    shape_kv = (1, args.kv_heads, args.n, args.head_dim)
    q, k, v = (torch.randn(s, generator=gen, device=args.device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv))

    def timed(fn) -> tuple[torch.Tensor, float]:
        fn()                                             # warm-up: compile, caches
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) * 1e3

    print(f"N={args.n} q={tuple(q.shape)} kv={tuple(k.shape)} {dtype} on {args.device}; "
          f"sink={args.sink} window={args.window} gamma={args.gamma}")
    _, dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"{'correction':<11} {'rel. error vs rule (fp64)':>26} {'ms':>9} {'x dense SDPA':>13}")
    rule = dict(sink=args.sink, window=args.window, gamma=args.gamma)
    for correction in CORRECTIONS:
        out, ms = timed(lambda: delta_attention(q, k, v, **rule, correction=correction))
        truth = reference_delta_attention(q.double(), k.double(), v.double(), **rule, correction=correction)
        print(f"{correction:<11} {rel_err(out, truth):>26.2e} {ms:>9.1f} {dense_ms / ms:>13.2f}")
    print(f"{'dense SDPA':<11} {'':>26} {dense_ms:>9.1f} {1.0:>13.2f}")


if __name__ == "__main__":
    main()
