"""Long-context prefill of a Llama-3.1-8B-shaped model: `torch.compile` default vs `backend="delta"`.

    python examples/llama_long_prefill.py [--tokens 32768] [--layers 32]

Random weights (no download), bf16, one H100/H200-class GPU; the logits of the last position only,
as a serving engine computes at prefill. The paper's config (sink 1024, window 2048, gamma 64) on
every layer. For the measured numbers and separate-process cold compiles see
benchmarks/bench_e2e.py and BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

import deltapass
from deltapass import presets


def llama_8b_shaped(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=262144, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def prefill_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1, use_cache=False)            # compile + warm-up
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--skip-default", action="store_true", help="time backend='delta' only (the default "
                    "Inductor build needs a tokens x tokens buffer: it runs out of memory at 128K)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU (the Δ kernels take bf16 on the GPU)")

    model = llama_8b_shaped(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    with torch.no_grad():                                # the grad mode of the prefill, as explain() needs
        print(deltapass.explain(model, ids[:, :4096]))

    delta = prefill_seconds(torch.compile(model, backend="delta"), ids)
    print(f"backend='delta': {delta:.3f} s for a {args.tokens}-token prefill")
    torch._dynamo.reset()
    dense = prefill_seconds(torch.compile(model, backend=deltapass.backend(presets.ALL_DENSE)), ids)
    print(f"all-dense (SDPA is_causal at every site): {dense:.3f} s  ->  {dense / delta:.2f}x faster with Δ")
    if not args.skip_default:
        torch._dynamo.reset()
        default = prefill_seconds(torch.compile(model), ids)
        print(f"torch.compile default: {default:.3f} s  ->  {default / delta:.2f}x faster with backend='delta'")


if __name__ == "__main__":
    main()
