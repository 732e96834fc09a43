"""SmolLM2-135M-Instruct (the embedded default model) with `backend="delta"` on a long pass-key prompt.

    python examples/smollm2_long_prompt.py [--tokens 2048] [--device cpu|cuda] [--config CONFIG.json]

What it shows, end to end on the real model:
  1. explain(): every attention site of the model and whether the pass replaces it;
  2. generate() on the model compiled in place with the delta backend: Δ prefill (the attention
     mask generate() passes is checked per call), exact decode; the answer next to the eager one
     (on the CPU the rest of the graph runs eagerly instead of through Inductor, to keep it quick);
  3. one prefill timed each way.
The config is the tuned one from the cache when `deltapass tune` has run on this device (the
backend logs which), else the config given, else sink 64 + window 256, gamma 64: at 2K-8K tokens
the paper's sink 1024 + window 2048 would leave most rows dense.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

import deltapass
from deltapass.search.models import load_model
from deltapass.search.tasks import answer_found, build_tasks


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
    ap.add_argument("--tokens", type=int, default=None, help="prompt length (default 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--config", default=None, help="a DeltaConfig JSON (default: the cache, else s64+w256 g64)")
    args = ap.parse_args()
    tokens = args.tokens or (8192 if args.device.startswith("cuda") else 2048)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deltapass.backend").setLevel(logging.INFO)      # says which config each graph uses

    loaded = load_model(args.model, device=args.device)
    task = build_tasks(loaded.tokenizer, lengths=(tokens,), samples=1, kinds=("passkey",), seed=7)[0]
    ids = task.input_ids[None].to(args.device)
    mask = torch.ones_like(ids)
    print(f"{loaded.name} on {args.device}: a {tokens}-token pass-key prompt (the key is {task.answer})\n")

    if args.config:
        config = deltapass.DeltaConfig.from_json(args.config)
    else:
        config = None                  # the backend looks for a tuned entry first ...
    fallback = deltapass.DeltaConfig(default=deltapass.SiteConfig(sink=64, window=256, gamma=64))
    print(deltapass.explain(loaded.model, ids[:, :256], config=config or fallback), "\n")

    # config None: the tuned entry, else fallback. On the CPU the rest of the graph runs eagerly: Inductor's
    # C++ compiles of every prefill and decode shape would take minutes there and show nothing new.
    inner = "inductor" if args.device.startswith("cuda") else "eager"
    backend = deltapass.backend(config, fallback=fallback, inner=inner)
    compiled = load_model(args.model, device=args.device).model           # a twin, compiled in place
    compiled.compile(backend=backend)                                      # so generate() runs compiled

    with torch.no_grad():
        eager_out, eager_s = timed(lambda: loaded.model.generate(ids, attention_mask=mask, max_new_tokens=10,
                                                                 do_sample=False))
        timed(lambda: compiled(ids, attention_mask=mask))                  # compile (not timed)
        delta_out, delta_s = timed(lambda: compiled.generate(ids, attention_mask=mask, max_new_tokens=10,
                                                             do_sample=False))
        _, eager_prefill = timed(lambda: loaded.model(ids, attention_mask=mask))
        _, delta_prefill = timed(lambda: compiled(ids, attention_mask=mask))
    for label, out, seconds in (("eager (dense)", eager_out, eager_s), ("backend=delta", delta_out, delta_s)):
        text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        verdict = "found" if answer_found(text, task) else "missed"
        print(f"{label:>14}: {text.strip()!r} -> key {verdict} ({seconds:.2f} s for prefill + 10 tokens)")
    print(f"\none prefill: eager {eager_prefill * 1e3:.0f} ms, backend=delta {delta_prefill * 1e3:.0f} ms "
          f"({args.device}; on the CPU the Δ op runs its exact reference path, so expect no speed-up there)")


if __name__ == "__main__":
    main()
