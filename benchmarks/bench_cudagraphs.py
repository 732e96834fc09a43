"""Prefill of a small model under CUDA graphs: torch.compile mode="default" vs mode="reduce-overhead".

    python benchmarks/bench_cudagraphs.py --out cudagraphs.json            # SmolLM2-135M shape, bf16, GPU
    python benchmarks/bench_cudagraphs.py --device cpu --tiny --lengths 256 --out cg_cpu.json  # plumbing

On a 135M model the Δ op is host-bound (BENCHMARKS.md, "Host time of one Δ op call"): its launches
cost more host time than its kernels take on the GPU. CUDA graphs replay the launches without the
host, so this compares each attention config with and without them, in one process, one model.
Random weights in SmolLM2-135M-Instruct's shapes (latency does not depend on the weights); logits
for the last position only, no KV cache. Times are triton's do_bench medians (warm, CUDA events, so
host gaps between kernels count). Before timing, every reduce-overhead output is checked against
the same backend's default-mode output, and one run with an input attention mask (the per-call
mask check, an op CUDA graphs cannot capture) checks that it runs outside the graphs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltapass
from deltapass import DeltaConfig, SiteConfig, presets
from record import header
from shapes import MODELS

ROOT = Path(__file__).resolve().parents[1]


def causal_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A hand-assembled dense baseline: SDPA with is_causal=True, never the materialised mask.

    Under torch.compile, transformers builds the causal mask as a tensor and SDPA runs with it (on the
    H200 that picks a masked cuDNN kernel ~3x slower than is_causal: results/cudagraphs/dense_attention_probe_h200.json,
    BENCHMARKS.md). Only valid without padding, as called here.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] == key.shape[2], scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register_causal_sdpa() -> str:
    """Make causal_sdpa_attention a transformers attention implementation; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_is_causal", causal_sdpa_attention)
    return "sdpa_is_causal"


def attention_configs(tiny: bool) -> dict[str, tuple[str, DeltaConfig | None]]:
    """label -> (transformers attention implementation, Δ config; None = plain Inductor, dense)."""
    rule = SiteConfig(sink=4, window=32, gamma=16) if tiny else SiteConfig(sink=64, window=256, gamma=64)
    configs = {"inductor (dense)": ("sdpa", None),
               "inductor (dense, SDPA is_causal)": (register_causal_sdpa(), None),
               "deltapass all-dense": ("sdpa", presets.ALL_DENSE),
               f"delta s{rule.sink}+w{rule.window} g{rule.gamma}": ("sdpa", DeltaConfig(default=rule))}
    if not tiny:
        configs["tuner's pick (docs/tuning/picked.json)"] = (
            "sdpa", DeltaConfig.from_json(ROOT / "docs/tuning/picked.json"))
    return configs


def build(tiny: bool, device: str, dtype: torch.dtype, max_len: int) -> LlamaForCausalLM:
    shape = MODELS["tiny-smollm2" if tiny else "smollm2-135m"]
    config = LlamaConfig(**shape.llama_config(), max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def compiled_prefill(model, config: DeltaConfig | None, mode: str):
    torch._dynamo.reset()
    backend = "inductor" if config is None else deltapass.backend(config, cache=False)
    compiled = torch.compile(model, backend=backend, mode=mode, dynamic=False)

    def prefill(ids, mask=None):
        torch.compiler.cudagraph_mark_step_begin()   # each call is a new step: earlier outputs may be overwritten
        return compiled(ids, attention_mask=mask, logits_to_keep=1, use_cache=False).logits.float().clone()

    return prefill, backend


def time_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    import statistics
    import time

    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_config(model, label: str, config, ids, device: str, check_mask: bool,
               modes: tuple[str, ...]) -> tuple[dict, torch.Tensor]:
    row: dict = {"config": label}
    with torch.no_grad():
        outputs = {}
        for mode in modes:
            prefill, backend = compiled_prefill(model, config, mode)
            for _ in range(3):     # compile, cudagraph warm-up, record
                outputs[mode] = prefill(ids)
            row[f"{mode}_ms"] = time_ms(lambda: prefill(ids), device)
            if config is not None:
                row["site_actions"] = sorted({d.action for d in backend.plans[-1].decisions})
                row["delta_sites"] = sum(d.uses_delta for d in backend.plans[-1].decisions)
        if len(modes) == 2:
            row["max_abs_diff_vs_default_mode"] = (outputs["reduce-overhead"] - outputs["default"]).abs().max().item()
            row["speedup_from_cudagraphs"] = row["default_ms"] / row["reduce-overhead_ms"]
        if check_mask and config is not None:
            row.update(check_input_masks(model, config, ids, outputs[modes[0]], modes))
    return row, outputs[modes[0]]


def check_input_masks(model, config: DeltaConfig, ids: torch.Tensor, unmasked: torch.Tensor,
                      modes: tuple[str, ...]) -> dict:
    """An input mask makes the pass check it per call (a host read): both modes must agree, graphs or not.

    An all-ones mask is causal after HF's merge (the Δ path); a left-padded one is not (the exact path).
    """
    from torch._dynamo.utils import counters

    padded = torch.ones_like(ids)
    padded[:, :16] = 0
    masks = {"ones": torch.ones_like(ids), "left_padded": padded}
    outs: dict = {}
    row: dict = {}
    for mode in modes:
        counters["inductor"].clear()
        prefill, backend = compiled_prefill(model, config, mode)
        for name, mask in masks.items():
            for _ in range(3):
                outs[mode, name] = prefill(ids, mask)
        row[f"masked_{mode}_sites_checked_per_call"] = sum(
            d.mask_checked_per_call for d in backend.plans[-1].decisions)
        row[f"masked_{mode}_inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    first, last = modes[0], modes[-1]
    for name in masks:
        row[f"mask_{name}_max_abs_diff_{last}_vs_{first}"] = (outs[last, name] - outs[first, name]).abs().max().item()
    row["mask_left_padded_max_abs_diff_vs_ones"] = (outs[first, "left_padded"] - outs[first, "ones"]).abs().max().item()
    row["mask_ones_max_abs_diff_vs_unmasked"] = (outs[first, "ones"] - unmasked).abs().max().item()
    for mode in modes:     # the masked graphs, timed: the per-call check splits the CUDA graphs
        prefill, _ = compiled_prefill(model, config, mode)
        ones = masks["ones"]
        for _ in range(3):
            prefill(ids, ones)
        row[f"mask_ones_{mode}_ms"] = time_ms(lambda: prefill(ids, ones), "cuda" if ids.is_cuda else "cpu")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--configs", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--mask-check-lengths", type=int, nargs="*", default=None,
                    help="lengths at which to also run with input masks (default: the shortest)")
    ap.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"],
                    choices=["default", "reduce-overhead"], help="torch.compile modes to time")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = "tiny-smollm2" if args.tiny else "smollm2-135m"
    result = {"meta": header(args.device, dtype=str(dtype), model=f"{shape} shape (benchmarks/shapes.py), random weights",
                             timing="triton do_bench median, warm" if cuda else "perf_counter median of 5"),
              "runs": []}
    mask_lengths = [min(args.lengths)] if args.mask_check_lengths is None else args.mask_check_lengths
    model = build(args.tiny, args.device, dtype, max(args.lengths))
    for n in args.lengths:
        dense_logits = None
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=args.device,
                            generator=torch.Generator(device=args.device).manual_seed(n))
        for label, (attention, config) in attention_configs(args.tiny).items():
            if args.configs is not None and label not in args.configs:
                continue
            model.set_attn_implementation(attention)
            row, logits = run_config(model, label, config, ids, args.device, check_mask=n in mask_lengths,
                                     modes=tuple(args.modes))
            row = {"n": n, **row}
            dense_logits = logits if dense_logits is None else dense_logits   # the first config is dense
            row["last_logits_max_abs_diff_vs_dense"] = (logits - dense_logits).abs().max().item()
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'N':>6} {'config':<42} " + " ".join(f"{m + ' ms':>20}" for m in args.modes) + "  diff vs dense")
    for r in result["runs"]:
        print(f"{r['n']:>6} {r['config']:<42} " + " ".join(f"{r[m + '_ms']:>20.2f}" for m in args.modes)
              + f"  {r['last_logits_max_abs_diff_vs_dense']:.1e}")


if __name__ == "__main__":
    main()
