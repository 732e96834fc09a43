"""SmolLM2-135M-Instruct (the embedded default model) with `backend="delta"` on a long pass-key prompt.

    python examples/smollm2_long_prompt.py [--tokens N] [--device cpu|cuda] [--config CONFIG.json]

What it shows, end to end on the real model:
  1. explain() on the whole prompt: every attention site and whether the pass replaces it;
  2. generate() (10 new tokens) on the model compiled in place with the delta backend: Δ prefill (the
     attention mask generate() passes is checked per call), exact decode; its answer next to the all-dense model's;
  3. the time of one prefill each way, both computing the last position's logits only, and of
     generate(), each timed after a warm-up run that compiles its prefill and decode graphs. The dense
     side is the same model compiled with deltapass.presets.ALL_DENSE: SDPA is_causal at every site (the
     best dense model a user could assemble), not transformers' masked attention.

The config is --config if given, else the tuned one from the cache when `deltapass tune` has run on this
device (the backend logs which), else sink 64 + window 256, gamma 64. explain() shows --config or that
last one. Δ only changes anything when the prompt is much longer than sink + window: below that
every row attends to all of its keys and the op computes plain dense attention.

What to expect:
  - on a GPU (default 32768 tokens, with YaRN): the Triton kernels run in bf16 and the rest of the graph
    goes through Inductor. At 8K, on a model this small, dense prefill is as fast as any sparse config
    (BENCHMARKS.md); the longer the prompt, the more of the prefill is attention that Δ skips.
  - on the CPU (default 1024 tokens, a few minutes): the Δ op runs the exact float32 reference of the
    rule (it is there to check results, not to be fast), so expect no speed-up over dense
    attention, usually a slow-down; the rest of the graph runs eagerly instead of through Inductor,
    whose C++ compiles of every prefill and decode shape would take minutes and show nothing new.
  - SmolLM2's native context is 8192 tokens: past it (--tokens 32768) the model is loaded with YaRN
    RoPE scaling (load_model(context=...)), which keeps pass-key retrieval working at 16K-32K.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers.utils import logging as hf_logging

import deltapass
from deltapass import presets
from deltapass.search.models import load_model
from deltapass.search.tasks import answer_found, build_tasks

NEW_TOKENS = 10


def timed(fn) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or model folder (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", "--context", type=int, default=None,
                    help="prompt length (default: 32768 on a GPU, 1024 on the CPU)")
    ap.add_argument("--config", default=None, help="a DeltaConfig JSON (default: the cache, else s64+w256 g64)")
    args = ap.parse_args()
    tokens = args.tokens or (32768 if args.device.startswith("cuda") else 1024)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deltapass.backend").setLevel(logging.INFO)      # says which config each graph uses
    hf_logging.disable_progress_bar()                                  # the GGUF loader's bars, twice

    loaded = load_model(args.model, device=args.device, context=tokens)   # YaRN past the native 8K
    task = build_tasks(loaded.tokenizer, lengths=(tokens,), samples=1, kinds=("passkey",), seed=7)[0]
    ids = task.input_ids[None].to(args.device)
    mask = torch.ones_like(ids)
    print(f"{loaded.name} on {args.device}: a {ids.shape[1]}-token pass-key prompt (the key is {task.answer})\n")

    config = deltapass.DeltaConfig.from_json(args.config) if args.config else None   # None: the cache first
    inner = "inductor" if args.device.startswith("cuda") else "eager"
    backend = deltapass.backend(config, fallback=presets.uniform(presets.SMALL), inner=inner)
    print(f"explain() on all {ids.shape[1]} tokens, with generate()'s attention mask, for the backend compiled below:")
    with torch.no_grad():
        report = deltapass.explain(loaded.model, ids, attention_mask=mask, backend=backend)
    print(report, "\n")
    used = report.choice.config.default if report.choice else presets.SMALL
    if ids.shape[1] <= 2 * (used.sink + used.window):
        print(f"note: at {ids.shape[1]} tokens sink + window covers most of the prompt, so Δ is close to dense "
              "attention here; pass a longer --tokens to see it differ\n")

    compiled = load_model(args.model, device=args.device, context=tokens).model    # a twin, compiled in place
    compiled.compile(backend=backend)                                      # so generate() runs compiled
    loaded.model.compile(backend=deltapass.backend(presets.ALL_DENSE, inner=inner))   # the dense baseline

    def generate(model):
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)

    def prefill(model):                                                    # last position's logits only
        return model(ids, attention_mask=mask, logits_to_keep=1)

    with torch.no_grad():
        for model in (compiled, loaded.model):
            generate(model)                                                # warm-up: compiles prefill + decode
            prefill(model)                                                 # and the logits_to_keep=1 graph
        dense_out, dense_s = timed(lambda: generate(loaded.model))
        delta_out, delta_s = timed(lambda: generate(compiled))
        _, dense_prefill = timed(lambda: prefill(loaded.model))
        _, delta_prefill = timed(lambda: prefill(compiled))

    print(f"generate(), prefill + {NEW_TOKENS} new tokens:")
    for label, out, seconds in (("all-dense", dense_out, dense_s), ("backend=delta", delta_out, delta_s)):
        text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        verdict = "found" if answer_found(text, task) else "missed"
        print(f"  {label:>13}: {text.strip()!r} -> key {verdict} ({seconds:.2f} s)")
    print(f"one prefill (last position's logits): all-dense {dense_prefill * 1e3:.0f} ms, "
          f"backend=delta {delta_prefill * 1e3:.0f} ms ({dense_prefill / delta_prefill:.2f}x) on {args.device}")
    if not args.device.startswith("cuda"):
        print("(on the CPU the Δ op runs the exact float32 reference of the rule, for checking, not speed: "
              "expect no speed-up over dense here, usually a slow-down; timings on a busy CPU vary a lot)")


if __name__ == "__main__":
    main()
