"""SmolLM2-135M-Instruct (the embedded default model) with `backend="delta"` on a long pass-key prompt.

    python examples/smollm2_long_prompt.py [--tokens N] [--device cpu|cuda] [--config CONFIG.json]

What it shows, end to end on the real model, in this order:
  1. explain() on the whole prompt: every attention site and whether the pass replaces it;
  2. the answer of each model to the pass-key question, and whether it holds the key: the prefill compiled,
     once all-dense and once with the Δ config, then 10 greedy tokens decoded exactly (uncompiled) over the
     prefill's KV cache: Δ is a prefill method, decode stays exact;
  3. the prefill's latency each way, the median of warm runs with its 10th-90th percentile, under CUDA graphs
     on a GPU (torch.compile mode="reduce-overhead"), and their ratio.

Only the prefill is compiled, and once: Dynamo traces the model one time and Inductor lowers that graph
once per config (all-dense: SDPA is_causal at every site, the dense model a user would assemble; and Δ).
Decode runs the model as it is. That keeps the GPU run to about two Inductor builds.

The config is --config if given, else the tuned one from the cache when `deltapass tune` has run on this
device at this length, else sink 64 + window 256, gamma 64; explain() says which. Δ only changes anything
when the prompt is much longer than sink + window: below that every row attends to all of its keys.

What to expect:
  - on a GPU (default 32768 tokens, with YaRN): the Δ kernels run in bf16, the rest of the graph through
    Inductor, both models under CUDA graphs.
  - on the CPU (default 1024 tokens, a few minutes): the Δ op runs the exact float32 reference of the rule
    (it is there to check results, not to be fast) and the rest of the graph runs eagerly, not through
    Inductor's C++ builds. The CPU timings say nothing about GPU speed, so no ratio is printed there.
  - SmolLM2's native context is 8192 tokens: past it (--tokens 32768) the model is loaded with YaRN RoPE
    scaling (load_model(context=...)), which keeps pass-key retrieval working at 16K-32K.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers.utils import logging as hf_logging

import deltapass
from deltapass import presets
from deltapass.search.harness import CompiledModel
from deltapass.search.models import load_model
from deltapass.search.tasks import answer_found, build_tasks

NEW_TOKENS = 10


def main() -> None:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or model folder (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", "--context", type=int, default=None,
                    help="prompt length (default: 32768 on a GPU, 1024 on the CPU)")
    ap.add_argument("--config", default=None, help="a DeltaConfig JSON (default: the cache, else s64+w256 g64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed prefills per model (default: 20 GPU, 3 CPU)")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    tokens = args.tokens or (32768 if gpu else 1024)
    if tokens < 1:
        ap.error(f"--tokens must be >= 1, got {tokens}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    hf_logging.disable_progress_bar()                                   # the loader's bars (GGUF included)
    elapsed = lambda: f"[{time.perf_counter() - start:.0f} s]"          # noqa: E731

    print(f"loading the model for {tokens} tokens on {args.device} ...", flush=True)
    loaded = load_model(args.model, device=args.device, context=tokens)   # YaRN past the native 8K
    task = build_tasks(loaded.tokenizer, lengths=(tokens,), samples=1, kinds=("passkey",), seed=7)[0]
    ids = task.input_ids[None].to(args.device)
    print(f"{loaded.name}: a {ids.shape[1]}-token pass-key prompt (the key is {task.answer}) {elapsed()}\n")

    config = deltapass.DeltaConfig.from_json(args.config) if args.config else None   # None: the cache first
    backend = deltapass.backend(config, fallback=presets.uniform(presets.SMALL))
    print(f"explain() on all {ids.shape[1]} tokens: the config the backend picks, and what each site gets")
    with torch.no_grad():
        report = deltapass.explain(loaded.model, ids, backend=backend)
    print(report, elapsed(), "\n")
    delta_config = report.choice.config if report.choice else presets.uniform(presets.SMALL)
    if not report.replaced:
        print(f"note: no site uses the Δ op at {ids.shape[1]} tokens (see the reasons above), so both runs "
              "below are dense attention; pass a longer --tokens to see Δ\n")

    model = CompiledModel(loaded, inner="inductor" if gpu else "eager")    # reduce-overhead on a GPU
    runs = {"all-dense": presets.ALL_DENSE, "backend=delta": delta_config}
    print(f"the answers: compiled prefill, then {NEW_TOKENS} exact greedy tokens over its cache")
    for label, run_config in runs.items():
        tokens_out = model.greedy(ids, run_config, NEW_TOKENS)
        text = loaded.tokenizer.decode(tokens_out[0], skip_special_tokens=True)
        verdict = "found" if answer_found(text, task) else "missed"
        print(f"  {label:>13}: {text.strip()!r} -> key {verdict} {elapsed()}", flush=True)

    repeats = args.repeats or (20 if gpu else 3)
    graphs = "under CUDA graphs" if model.mode == "reduce-overhead" else f"torch.compile mode {model.mode!r}"
    print(f"\nprefill latency ({ids.shape[1]} tokens, last position's logits, {graphs}), median of {repeats} warm "
          "runs [10th-90th percentile]:")
    medians = {}
    for label, run_config in runs.items():
        t = model.latency(run_config, ids.shape[1], repeats=repeats)
        medians[label] = t.median_ms
        print(f"  {label:>13}: {t.median_ms:9.2f} ms [{t.p10_ms:.2f}-{t.p90_ms:.2f}]", flush=True)
    if gpu:
        print(f"  backend=delta is {medians['all-dense'] / medians['backend=delta']:.2f}x all-dense")
    else:
        print("  (no ratio on the CPU: the Δ op runs the exact float32 reference of the rule there, for checking)")
    print(f"\ndone in {time.perf_counter() - start:.0f} s, model load and compiles included")


if __name__ == "__main__":
    main()
