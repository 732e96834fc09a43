"""GPU check of the masked Δ op (attention whose mask comes from the inputs), bf16.

    python benchmarks/check_masked_gpu.py --out masked.json

For each mask encoding: an exactly causal mask must give the Δ op's result bit for bit, and a
padded mask exact attention under that mask (compared with float64 SDPA). Also times the
per-call mask check against the attention it guards (median of warm runs, triton's do_bench).
"""
from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from deltapass.kernels import delta_attention, delta_attention_masked, mask_is_causal
from record import header

RULE = dict(sink=64, window=256, gamma=64)


def encode(keep: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "keep":
        return keep
    if kind == "blocked":
        return ~keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = []
    for n, hq, hkv, batch in ((4099, 9, 3, 2), (8192, 32, 8, 1)):
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(batch, h, n, 128 if hq == 32 else 64, device="cuda", generator=gen,
                               dtype=torch.bfloat16) for h in (hq, hkv, hkv))
        causal = torch.ones(n, n, dtype=torch.bool, device="cuda").tril().expand(batch, 1, n, n)
        padded = causal.clone()
        padded[0, :, :, :100] = False
        padded[0, :, torch.arange(100), torch.arange(100)] = True
        expected = delta_attention(q, k, v, **RULE)
        for kind in ("keep", "blocked", "additive"):
            out = delta_attention_masked(q, k, v, encode(causal, kind, q.dtype), mask_kind=kind, **RULE)
            same = bool(torch.equal(out, expected))
            out = delta_attention_masked(q, k, v, encode(padded, kind, q.dtype), mask_kind=kind, **RULE)
            truth = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), attn_mask=padded, enable_gqa=True)
            low = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padded, enable_gqa=True)
            err = (out.double() - truth).abs().max().item()
            bar = 2 * (low.double() - truth).abs().max().item()
            results.append(dict(n=n, hq=hq, hkv=hkv, batch=batch, kind=kind, causal_equals_delta=same,
                                padded_err=err, padded_bar=bar, ok=same and err <= bar))
        mask = causal
        check_ms = do_bench(lambda: mask_is_causal(mask, "keep"), warmup=10, rep=100, return_mode="median")
        attn_ms = do_bench(lambda: delta_attention(q, k, v, **RULE), warmup=10, rep=100, return_mode="median")
        results.append(dict(n=n, hq=hq, batch=batch, mask_check_ms=check_ms, delta_attention_ms=attn_ms))
    with open(args.out, "w") as f:
        json.dump({"meta": header(rule=RULE), "results": results}, f, indent=1)
    for r in results:
        print(r)
    bad = [r for r in results if r.get("ok") is False]
    print(f"{len(bad)} failing cases")


if __name__ == "__main__":
    main()
