"""The tuner's two engines on the GPU, side by side on the real model, and the all-dense graphs.

    python benchmarks/check_switching_gpu.py --model M.gguf --context 32768 --length 32768 --out switching.json

Part 1: for each config, the search engine (one lowering, run-time site slots, one CUDA-graph recording
per config) against the graph users get (one lowering per config, torch.compile's CUDA graphs): first-call
seconds (lowering, recording), warm prefill latency (harness.CompiledModel.latency: median of 20 runs),
and the last-position logits of one pass-key prompt; then the first config again on the search engine
after the others (a switch back must not replay another config's recording).
Part 2 (--dense-graphs): SmolLM2 prefill without a cache, deltapass all-dense vs SDPA is_causal wired in
by hand, both under CUDA graphs, timed in one process; the FX graphs each hands to Inductor are saved
next to --out for diffing.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import deltapass
from deltapass import SiteConfig, presets
from deltapass.search.harness import CompiledModel
from deltapass.search.models import load_model
from deltapass.search.tasks import build_tasks
from record import header


def configs() -> dict:
    return {"all-dense": None,
            "tail s128+w768": presets.uniform(SiteConfig(sink=128, window=768, gamma=64, correction="tail")),
            "paper delta s64+w256": presets.uniform(presets.SMALL)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_call(fn) -> tuple[object, float]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def engines(loaded, length: int, record: dict) -> None:
    task = build_tasks(loaded.tokenizer, lengths=(length,), samples=1, kinds=("passkey",), seed=3)[0]
    ids = task.input_ids[None].to(next(loaded.model.parameters()).device)
    search, users = CompiledModel(loaded, switched=True), CompiledModel(loaded)
    first_logits = {}
    for name, config in configs().items():
        row = {"config": name}
        (s_logits, _), row["search_first_call_s"] = first_call(lambda: search.prefill(ids, config))
        s_logits = s_logits.clone()
        row["search_ms"] = search.latency(config, length).median_ms
        (u_logits, _), row["users_first_call_s"] = first_call(lambda: users.prefill(ids, config))
        row["users_ms"] = users.latency(config, length).median_ms
        row["search_over_users"] = row["search_ms"] / row["users_ms"]
        row["logits_max_abs_diff"] = (s_logits.float() - u_logits.float()).abs().max().item()
        row["same_argmax"] = bool(torch.equal(s_logits.argmax(-1), u_logits.argmax(-1)))
        first_logits[name] = s_logits
        record["engines"].append(row)
        print(json.dumps(row), flush=True)
    name = next(iter(first_logits))
    again, _ = search.prefill(ids, configs()[name])
    record["switch_back_equal"] = bool(torch.equal(again, first_logits[name]))
    record["search_lowerings"] = len(search.backend.plans)


def dense_graphs(loaded, length: int, out_dir: Path, record: dict) -> None:
    from triton.testing import do_bench

    from bench_cudagraphs import register_causal_sdpa     # the hand-built SDPA is_causal baseline

    hand_built = register_causal_sdpa()
    model = loaded.model
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    codes: dict[str, list[str]] = {"hand-built": [], "deltapass": []}

    def saving(label):
        def compile_graph(gm, example_inputs):
            codes[label].append(gm.code)
            return torch._TorchCompileInductorWrapper("reduce-overhead", {}, None)(gm, example_inputs)
        return compile_graph

    rows = {}
    for label, implementation, backend in (
            ("hand-built", hand_built, saving("hand-built")),
            ("deltapass", "sdpa", deltapass.backend(presets.ALL_DENSE, cache=False, inner=saving("deltapass")))):
        torch._dynamo.reset()
        model.config._attn_implementation = implementation
        compiled = torch.compile(model, backend=backend, dynamic=False)

        def prefill():
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(ids, logits_to_keep=1, use_cache=False).logits.clone()

        with torch.no_grad():
            for _ in range(3):
                logits = prefill()
            rows[label] = {"ms": do_bench(prefill, warmup=50, rep=300, return_mode="median"), "logits": logits}
        (out_dir / f"dense_graph_{label}.py").write_text("\n\n# ---- next graph ----\n".join(codes[label]))
    model.config._attn_implementation = "sdpa"
    record["dense"] = {label: r["ms"] for label, r in rows.items()}
    record["dense"]["deltapass_over_hand_built"] = rows["deltapass"]["ms"] / rows["hand-built"]["ms"]
    record["dense"]["logits_max_abs_diff"] = (rows["deltapass"]["logits"].float()
                                              - rows["hand-built"]["logits"].float()).abs().max().item()
    record["dense"]["graph_lines"] = {label: sum(c.count("\n") for c in codes[label]) for label in codes}
    print(json.dumps(record["dense"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--dense-graphs", type=int, default=0, help="prompt length of part 2 (0: skip it)")
    ap.add_argument("--skip-engines", action="store_true", help="skip part 1")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script (part 1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    record = {"meta": header(args.device, model=args.model, length=args.length, context=args.context), "engines": []}
    loaded = load_model(args.model, device=args.device, context=args.context)
    for part, run in (("engines", lambda: args.skip_engines or engines(loaded, args.length, record)),
                      ("dense graphs", lambda: args.dense_graphs and dense_graphs(loaded, args.dense_graphs,
                                                                                  out.parent, record))):
        try:
            run()
        except Exception:      # record the failure and go on to the next part
            record.setdefault("errors", {})[part] = traceback.format_exc()
            print(record["errors"][part], flush=True)
        out.write_text(json.dumps(record, indent=1))
    print(f"{'config':<22} {'search ms':>10} {'users ms':>9} {'ratio':>6} {'1st s (s/u)':>12} {'logit diff':>10}")
    for r in record["engines"]:
        print(f"{r['config']:<22} {r['search_ms']:>10.2f} {r['users_ms']:>9.2f} {r['search_over_users']:>6.3f} "
              f"{r['search_first_call_s']:>5.1f}/{r['users_first_call_s']:<6.1f} {r['logits_max_abs_diff']:>10.4f}")
    print("switch back equal:", record.get("switch_back_equal"), "dense:", record.get("dense", {}))


if __name__ == "__main__":
    main()
