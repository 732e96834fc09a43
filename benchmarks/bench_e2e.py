"""End-to-end prefill: a dense compiled model vs backend="delta", in one run.

    python benchmarks/bench_e2e.py --out e2e.json                 # Llama-3.1-8B shape, bf16, GPU
    python benchmarks/bench_e2e.py --model qwen2.5-7b-1m --lengths 131072 --out e2e.json   # any shapes.py entry
    python benchmarks/bench_e2e.py --model tiny-llama --device cpu --lengths 400 --out e2e_cpu.json   # plumbing check

The default dense baseline is Inductor with SDPA called as is_causal=True (the dense model an engineer
assembles by hand); `--backends inductor delta` compares with plain torch.compile, under which transformers
materialises the N x N causal mask (slower, and out of memory at 128K).

Random weights; the model computes logits for the last position only (logits_to_keep=1), no KV
cache. Each (backend, length) runs in a fresh process with empty Inductor and Triton caches, so
both compiles are cold and neither reuses the other's kernels. Reports the median of warm runs,
the compile time (first call minus a warm call), and Dynamo's graph-break and graph counters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltapass  # noqa: F401  (registers the op; the backend itself comes through the entry point)
from record import header
from shapes import MODELS, model_shape


# A dense baseline assembled by hand: Inductor, with SDPA called as is_causal=True instead of on the
# causal mask transformers materialises under torch.compile (N x N: slower, and out of memory at 128K).
IS_CAUSAL_BACKEND = "inductor_is_causal"


def build(shape: str, device: str, dtype: torch.dtype, max_len: int, is_causal_sdpa: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(**model_shape(shape).llama_config(), max_position_embeddings=max_len)
    attention = "sdpa"
    if is_causal_sdpa:
        from bench_cudagraphs import register_causal_sdpa

        attention = register_causal_sdpa()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attention, dtype=dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_backend(model, backend: str, ids: torch.Tensor, device: str, repeats: int) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="inductor" if backend == IS_CAUSAL_BACKEND else backend, dynamic=False)
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        logits = compiled(ids, logits_to_keep=1, use_cache=False).logits
        sync(device)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            logits = compiled(ids, logits_to_keep=1, use_cache=False).logits
            sync(device)
            times.append(time.perf_counter() - start)
    counters = torch._dynamo.utils.counters
    return {"backend": backend, "first_call_s": first, "times_s": times, "median_s": statistics.median(times),
            "compile_s": first - statistics.median(times),
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(v for k, v in counters["stats"].items() if k == "unique_graphs"),
            "logits": logits.float().cpu()}


def worker(args) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build(args.model, args.device, dtype, args.length, is_causal_sdpa=args.backend == IS_CAUSAL_BACKEND)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=args.device,
                        generator=torch.Generator(device=args.device).manual_seed(1))
    res = run_backend(model, args.backend, ids, args.device, args.repeats)
    torch.save(res.pop("logits"), args.logits)
    res["n"] = args.length
    print("RESULT " + json.dumps(res), flush=True)


def spawn(args, backend: str, length: int, logits: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton")
        cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--lengths", str(length),
               "--device", args.device, "--repeats", str(args.repeats), "--logits", logits,
               "--model", args.model, "--out", "-"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"backend": backend, "n": length, "error": proc.stderr[-1500:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODELS), help="a shape of benchmarks/shapes.py")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=[IS_CAUSAL_BACKEND, "delta"],
                    help="torch.compile backends to compare; the first is the baseline; "
                         f"{IS_CAUSAL_BACKEND!r}: Inductor with SDPA(is_causal=True) in place of the mask")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.length = args.lengths[0]
        return worker(args)

    result = {"meta": header(args.device, model=f"{args.model} shape (benchmarks/shapes.py), random weights",
                             dtype="bfloat16" if args.device.startswith("cuda") else "float32",
                             config="deltapass defaults (sink 1024, window 2048, gamma 64, delta)",
                             backends=args.backends, repeats=args.repeats), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lengths:
            pair = {b: spawn(args, b, n, f"{tmp}/{b}_{n}.pt") for b in args.backends}
            run = {"n": n, **pair}
            print(json.dumps(run), flush=True)
            if len(pair) == 2 and all("error" not in r for r in pair.values()):
                base, other = args.backends
                dense, delta = torch.load(f"{tmp}/{base}_{n}.pt"), torch.load(f"{tmp}/{other}_{n}.pt")
                pair = {"inductor": pair[base], "delta": pair[other]}
                run["speedup"] = pair["inductor"]["median_s"] / pair["delta"]["median_s"]
                run["compile_ratio"] = pair["delta"]["compile_s"] / max(pair["inductor"]["compile_s"], 1e-9)
                run["last_logits_max_abs_diff"] = (dense - delta).abs().max().item()
                run["last_logits_cosine"] = torch.nn.functional.cosine_similarity(
                    dense.flatten(), delta.flatten(), dim=0).item()
            result["runs"].append(run)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(f"\n{'N':>8} {args.backends[0] + ' s':>11} {args.backends[-1] + ' s':>9} {'speedup':>8} {'compile s ind/delta':>20} "
          f"{'breaks':>7} {'logit cos':>9}")
    for r in result["runs"]:
        if "speedup" not in r:
            for b in args.backends:
                res = r[b]
                print(f"{r['n']:>8} {b}: " + (f"{res['median_s']:.3f} s (compile {res['compile_s']:.1f} s)"
                                               if "median_s" in res else f"failed: {res['error'][-300:]}"))
            continue
        ind, dl = (r[b] for b in args.backends)
        print(f"{r['n']:>8} {ind['median_s']:>11.3f} {dl['median_s']:>9.3f} {r['speedup']:>8.2f} "
              f"{ind['compile_s']:>9.1f}/{dl['compile_s']:<10.1f} {ind['graph_breaks']:>3}/{dl['graph_breaks']:<3} "
              f"{r['last_logits_cosine']:>9.4f}")


if __name__ == "__main__":
    main()
