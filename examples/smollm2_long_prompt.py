"""SmolLM2-135M-Instruct (the embedded default model) with `backend="delta"` on a long pass-key prompt.

    python examples/smollm2_long_prompt.py [--tokens N] [--device cpu|cuda] [--config CONFIG.json]

What it shows, end to end on the real model:
  1. explain() on the whole prompt: every attention site and whether the pass replaces it;
  2. generate() (10 new tokens) on the model compiled in place with the delta backend: Δ prefill (the
     attention mask generate() passes is checked per call), exact decode; its answer next to eager's;
  3. the time of one prefill each way, both computing the last position's logits only, and of
     generate(), the compiled one timed after a warm-up run that compiles its prefill and decode graphs.

The config is --config if given, else the tuned one from the cache when `deltapass tune` has run on this
device (the backend logs which), else sink 64 + window 256, gamma 64. explain() shows --config or that
last one. Δ only changes anything when the prompt is much longer than sink + window: below that
every row attends to all of its keys and the op computes plain dense attention.

What to expect:
  - on a GPU (default 8192 tokens): the Triton kernels run in bf16 and the rest of the graph goes
    through Inductor. On a model this small, dense prefill at 8K is still faster than any sparse config
    (docs/ACCURACY.md, docs/TUNING.md): the point here is the answer, not the time.
  - on the CPU (default 1024 tokens, a few minutes): the Δ op runs the exact float32 reference of the
    rule (it is there to check results, not to be fast), so expect no speed-up over eager dense
    attention, usually a slow-down; the rest of the graph runs eagerly instead of through Inductor,
    whose C++ compiles of every prefill and decode shape would take minutes and show nothing new.
  - SmolLM2's native context is 8192 tokens: past it (--tokens 32768) its RoPE does not hold up and
    dense attention misses the key too, unless the model is given RoPE scaling (YaRN).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers.utils import logging as hf_logging

import deltapass
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
                    help="prompt length (default: 8192 on a GPU, 1024 on the CPU)")
    ap.add_argument("--config", default=None, help="a DeltaConfig JSON (default: the cache, else s64+w256 g64)")
    args = ap.parse_args()
    tokens = args.tokens or (8192 if args.device.startswith("cuda") else 1024)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deltapass.backend").setLevel(logging.INFO)      # says which config each graph uses
    hf_logging.disable_progress_bar()                                  # the GGUF loader's bars, twice

    loaded = load_model(args.model, device=args.device)
    task = build_tasks(loaded.tokenizer, lengths=(tokens,), samples=1, kinds=("passkey",), seed=7)[0]
    ids = task.input_ids[None].to(args.device)
    mask = torch.ones_like(ids)
    print(f"{loaded.name} on {args.device}: a {ids.shape[1]}-token pass-key prompt (the key is {task.answer})\n")

    config = deltapass.DeltaConfig.from_json(args.config) if args.config else None   # None: the cache first
    fallback = deltapass.DeltaConfig(default=deltapass.SiteConfig(sink=64, window=256, gamma=64))
    shown = config or fallback
    reach = shown.default.sink + shown.default.window
    print(f"explain() on all {ids.shape[1]} tokens, with generate()'s attention mask "
          f"(sink + window = {reach} tokens):")
    print(deltapass.explain(loaded.model, ids, attention_mask=mask, config=shown), "\n")
    if ids.shape[1] <= 2 * reach:
        print(f"note: at {ids.shape[1]} tokens sink + window covers most of the prompt, so Δ is close to dense "
              "attention here; pass a longer --tokens to see it differ\n")

    inner = "inductor" if args.device.startswith("cuda") else "eager"
    backend = deltapass.backend(config, fallback=fallback, inner=inner)
    compiled = load_model(args.model, device=args.device).model           # a twin, compiled in place
    compiled.compile(backend=backend)                                      # so generate() runs compiled

    def generate(model):
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)

    def prefill(model):                                                    # last position's logits only
        return model(ids, attention_mask=mask, logits_to_keep=1)

    with torch.no_grad():
        generate(compiled)                                                 # warm-up: compiles prefill + decode
        prefill(compiled)                                                  # and the logits_to_keep=1 graph
        eager_out, eager_s = timed(lambda: generate(loaded.model))
        delta_out, delta_s = timed(lambda: generate(compiled))
        _, eager_prefill = timed(lambda: prefill(loaded.model))
        _, delta_prefill = timed(lambda: prefill(compiled))

    print(f"generate(), prefill + {NEW_TOKENS} new tokens:")
    for label, out, seconds in (("eager (dense)", eager_out, eager_s), ("backend=delta", delta_out, delta_s)):
        text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        verdict = "found" if answer_found(text, task) else "missed"
        print(f"  {label:>13}: {text.strip()!r} -> key {verdict} ({seconds:.2f} s)")
    print(f"one prefill (last position's logits): eager {eager_prefill * 1e3:.0f} ms, "
          f"backend=delta {delta_prefill * 1e3:.0f} ms on {args.device}")
    if not args.device.startswith("cuda"):
        print("(on the CPU the Δ op runs the exact float32 reference of the rule, for checking, not speed: "
              "expect no speed-up over dense here, usually a slow-down; timings on a busy CPU vary a lot)")


if __name__ == "__main__":
    main()
