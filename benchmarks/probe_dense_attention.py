"""Why the default-compiled dense model is slow: standalone SDPA vs the attention inside it (GPU).

    cd /path/with/benchmarks && OUT=results python benchmarks/probe_dense_attention.py

SmolLM2-135M's attention shape at 8K (9 query / 3 K/V heads, D=64, bf16): SDPA with is_causal=True
under each backend, the Δ op (sink 64 + window 256, gamma 64), then a torch.profiler table of the
plain torch.compile'd model's CUDA kernels, and the eager model's time. Writes
$OUT/dense_probe.json; prints the profiler table and the timings.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cudagraphs import build  # noqa: E402

from deltapass.kernels import delta_attention  # noqa: E402


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    out = {}
    q = torch.randn(1, 9, 8192, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 8192, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_expanded, v_expanded = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    out["sdpa_gqa_auto_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    out["sdpa_expanded_auto_ms"] = bench(
        lambda: F.scaled_dot_product_attention(q, k_expanded, v_expanded, is_causal=True))
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                out[f"sdpa_gqa_{name}_ms"] = bench(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        except RuntimeError as exc:   # a backend that does not take these inputs
            out[f"sdpa_gqa_{name}_ms"] = repr(exc)[:200]
    out["delta_op_s64w256g64_ms"] = bench(lambda: delta_attention(q, k, v, sink=64, window=256, gamma=64))

    model = build(False, "cuda", torch.bfloat16, 8192)
    ids = torch.randint(0, model.config.vocab_size, (1, 8192), device="cuda")
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            compiled(ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            compiled(ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
        out["eager_model_ms"] = bench(lambda: model(ids, logits_to_keep=1, use_cache=False))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table)
    out["profile_top"] = table
    os.makedirs(os.environ["OUT"], exist_ok=True)
    with open(os.path.join(os.environ["OUT"], "dense_probe.json"), "w") as f:
        json.dump(out, f, indent=1)
    print({key: value for key, value in out.items() if key != "profile_top"})


if __name__ == "__main__":
    main()
