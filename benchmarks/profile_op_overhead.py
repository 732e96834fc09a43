"""Where a Δ op call spends host time on the GPU: per-call enqueue cost of each layer of the call path.

    python benchmarks/profile_op_overhead.py --out overhead.json [--profile overhead_cprofile.txt] [--label NAME]
    python benchmarks/profile_op_overhead.py --summarize runs/*.json   # median over runs, per label

For each shape: the GPU time of one call (triton's do_bench, median of warm runs) and the host time
to enqueue one call (mean over a burst of calls that the GPU queue absorbs without blocking), for:
  op        - deltapass.kernels.delta_attention, what the pass calls (custom-op dispatch included)
  forward   - the op's body without the dispatcher (checks off)
  launch    - launch_delta_attention with a prepared plan and launch config (the two Triton launches)
  sdpa      - F.scaled_dot_product_attention(is_causal=True), what the op replaces
  empty     - one trivial Triton kernel launch, the floor of a Triton call
A cProfile of op calls lists the Python functions behind the host time. Before timing, the op's
output must equal the direct launch's bit for bit (the host path only prepares arguments).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from deltapass.kernels import delta_attention
from deltapass.kernels.launch import LaunchConfig
from deltapass.kernels.op import _delta_attention_op, _forward
from deltapass.kernels.rule import DeltaPlan
from deltapass.kernels.triton_delta import launch_delta_attention

RULE = dict(sink=64, window=256, gamma=64, correction="delta")
SHAPES = (  # (name, batch, q heads, kv heads, N, head dim)
    ("smollm2-2k", 1, 9, 3, 2048, 64),
    ("smollm2-8k", 1, 9, 3, 8192, 64),
    ("llama8b-8k", 1, 32, 8, 8192, 128),
)
BURST = 200


@triton.jit
def _empty_kernel(x):
    pass


def host_us(fn, burst: int = BURST) -> float:
    """Mean host time of one enqueue, over a burst short enough not to block on the GPU queue."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(burst):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / burst * 1e6


def variants(q, k, v):
    launch_fields = LaunchConfig().to_dict()      # the op takes each launch parameter by name
    plan = DeltaPlan(q.shape[2], RULE["sink"], RULE["window"], RULE["gamma"], RULE["correction"])
    resolved = LaunchConfig().resolved(q.shape[-1], q.device)
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    probe = torch.empty(1, device="cuda")
    return {
        "op": lambda: delta_attention(q, k, v, **RULE),
        "op_overload": lambda: _delta_attention_op(q, k, v, RULE["sink"], RULE["window"], RULE["gamma"],
                                                   RULE["correction"], None, **launch_fields),
        "forward": lambda: _forward(q, k, v, RULE["sink"], RULE["window"], RULE["gamma"], RULE["correction"],
                                    None, LaunchConfig()),
        "launch": lambda: launch_delta_attention(q, k, v, out, plan, scale, resolved),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                         enable_gqa=True),
        "empty": lambda: _empty_kernel[(1,)](probe),
    }


def summarize(paths: list[str]) -> None:
    """Median host and GPU time per (label, shape, variant) over the given runs."""
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in data["rows"]:
            runs.setdefault((data["meta"].get("label", ""), row["shape"], row["variant"]), []).append(row)
    print(f"{'label':<8} {'shape':<12} {'variant':<12} {'runs':>4} {'gpu ms':>8} {'host us':>8} {'host range':>14}")
    for (label, shape, variant), rows in runs.items():
        host = sorted(r["host_us"] for r in rows)
        gpu = statistics.median(r["gpu_ms"] for r in rows)
        print(f"{label:<8} {shape:<12} {variant:<12} {len(rows):>4} {gpu:>8.3f} {statistics.median(host):>8.1f} "
              f"{f'{host[0]:.0f}-{host[-1]:.0f}':>14}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", nargs="+", metavar="JSON", help="print the medians of earlier runs and exit")
    ap.add_argument("--out")
    ap.add_argument("--profile", default=None, help="write the cProfile of op calls here")
    ap.add_argument("--label", default="", help="which build of deltapass this is (kept in the JSON)")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    if not args.out:
        ap.error("--out is required unless --summarize is given")
    rows = []
    for name, batch, hq, hkv, n, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(n + hq)
        q, k, v = (torch.randn(batch, h, n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
                   for h in (hq, hkv, hkv))
        fns = variants(q, k, v)
        if not torch.equal(fns["op"](), fns["launch"]()):
            raise SystemExit(f"{name}: the op's output differs from the direct launch's")
        for variant, fn in fns.items():
            gpu_ms = do_bench(fn, warmup=50, rep=200, return_mode="median")
            rows.append(dict(shape=name, batch=batch, q_heads=hq, kv_heads=hkv, n=n, head_dim=d,
                             variant=variant, gpu_ms=gpu_ms, host_us=host_us(fn)))
    q, k, v = (torch.randn(1, h, 2048, 64, device="cuda", dtype=torch.bfloat16) for h in (9, 3, 3))
    fn = variants(q, k, v)["op"]
    host_us(fn)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(BURST):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    profile_text = stream.getvalue()
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(profile_text)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                rule=RULE, burst=BURST, label=args.label)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"{'shape':<12} {'variant':<12} {'gpu ms':>8} {'host us':>8}")
    for r in rows:
        print(f"{r['shape']:<12} {r['variant']:<12} {r['gpu_ms']:>8.3f} {r['host_us']:>8.1f}")


if __name__ == "__main__":
    main()
