"""GPU correctness sweep of the Δ kernels: every head dim, fp16 and bf16, GQA ratios, odd N, every mode.

    python benchmarks/check_kernels_gpu.py --out checks.json

Each case runs each kernel path (the Triton kernels; the Hopper kernels where they fit) into NaN-poisoned outputs and compares with the float64 reference
of the rule; the bar is PyTorch computing the same rule in the same low precision (kernel max error
<= 2x PyTorch's, on all rows and on the rule's exact rows). Each rule check then runs the public op on the
same values laid out as a compiled model passes them (q, k, v transposed views of [B, N, H, D] tensors,
which both paths read in place): its output must have q's strides and the contiguous run's bits.
More checks, with the same bar:
  * the op with fewer queries than keys (decode, a last chunk inside the rule's dense tail): exact
    attention with query i at key position N_k - N_q + i, against a float64 whole-matrix truth;
  * a batch of 3 (B > 1 in one call; the Hopper path loops over it) into a NaN-poisoned output, each
    sequence against its own float64 reference;
  * chunked prefill: the case's prompt in chunks (multiples of gamma, and misaligned starts) over the
    growing keys, each chunk into a NaN-poisoned output against the float64 reference of its rows; the
    aligned chunks together against the one-shot float64 reference;
  * the packed variable-length op on mixed lengths (odd, shorter than sink + window, chunks of longer
    prompts) into a NaN-poisoned packed output, each sequence against its float64 reference;
  * exact_attention_masked (exact sites whose mask comes from the inputs) with an exactly causal
    mask and with a left-padded one, against float64 attention under that mask.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from deltapass.kernels import (CORRECTIONS, DeltaPlan, LaunchConfig, delta_attention, exact_attention_masked,
                               reference_delta_attention)
from deltapass.kernels.dispatch import hopper_reason, launch_delta
from deltapass.kernels.varlen import _by_sequence
from record import header

# (N, Hq, Hkv, D, sink, window, gamma)
CASES = [
    (4099, 9, 3, 64, 64, 256, 64),
    (3001, 8, 8, 80, 17, 300, 48),
    (2500, 12, 4, 96, 0, 500, 100),
    (8192, 32, 8, 128, 1024, 2048, 64),
    (2049, 8, 1, 256, 100, 400, 32),
    (1000, 4, 2, 128, 64, 2048, 64),      # N <= sink + window: exact
]
PATHS = {"triton": -1, "hopper": 1}     # LaunchConfig.hopper of each kernel path
# Query lengths checked against each case's N keys: one decode step, an odd chunk.
SHORT_QUERIES = (1, 37)


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention under a boolean mask in q's dtype (float64 inputs give the truth); K/V read per group."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)


def bar_result(res: dict, out: torch.Tensor, truth: torch.Tensor, torch_low: torch.Tensor) -> dict:
    """Fill kernel/torch errors and pass (no NaN, kernel max error <= 2x PyTorch's in the same dtype)."""
    res.update(nan=bool(out.isnan().any()), kernel_max=max_err(out, truth), torch_max=max_err(torch_low, truth))
    res["pass"] = not res["nan"] and res["kernel_max"] <= 2 * res["torch_max"]
    return res


def check_rule(q, k, v, sink, window, gamma, correction, path: str) -> dict:
    n, d = q.shape[2], q.shape[3]
    kw = dict(sink=sink, window=window, gamma=gamma, correction=correction)
    plan = DeltaPlan(n, sink, window, gamma, correction)
    out = torch.full_like(q, float("nan"))
    delta = torch.full((1, q.shape[1], max(plan.n_samples, 1), d), float("nan"), device="cuda")
    launch_delta(q, k, v, out, plan, 1 / math.sqrt(d), LaunchConfig(hopper=PATHS[path]), delta=delta)
    truth = reference_delta_attention(*(t.double() for t in (q, k, v)), **kw)
    torch_low = reference_delta_attention(q, k, v, **kw)
    rows = torch.arange(n, device="cuda") if plan.exact else plan.dense_row_positions("cuda")
    res = bar_result({"check": "rule", "correction": correction, "path": path}, out, truth, torch_low)
    if rows.numel():
        res["kernel_exact_rows_max"] = max_err(out[:, :, rows], truth[:, :, rows])
        res["torch_exact_rows_max"] = max_err(torch_low[:, :, rows], truth[:, :, rows])
        res["pass"] = res["pass"] and res["kernel_exact_rows_max"] <= 2 * res["torch_exact_rows_max"]
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out_t = delta_attention(qt, kt, vt, **kw, hopper=PATHS[path])
    res["transposed_output_follows_q"] = out_t.stride() == qt.stride()
    res["transposed_bitwise_equal"] = torch.equal(out_t, out)
    res["pass"] = res["pass"] and res["transposed_output_follows_q"] and res["transposed_bitwise_equal"]
    return res


def check_batch(q, k, v, sink, window, gamma, path: str) -> dict:
    """Three sequences in one call (the case's, its reverse, its negation) into a NaN-poisoned output."""
    q, k, v = (torch.cat([t, t.flip(2), -t]) for t in (q, k, v))
    kw = dict(sink=sink, window=window, gamma=gamma, correction="delta")
    plan = DeltaPlan(q.shape[2], sink, window, gamma, "delta")
    out = torch.full_like(q, float("nan"))
    launch_delta(q, k, v, out, plan, 1 / math.sqrt(q.shape[3]), LaunchConfig(hopper=PATHS[path]))
    truth = reference_delta_attention(*(t.double() for t in (q, k, v)), **kw)
    return bar_result({"check": "batch", "path": path, "b": 3}, out, truth, reference_delta_attention(q, k, v, **kw))


def _launch_chunk(q, k, v, plan: DeltaPlan) -> torch.Tensor:
    out = torch.full_like(q, float("nan"))
    launch_delta(q, k, v, out, plan, 1 / math.sqrt(q.shape[3]), LaunchConfig(hopper=-1))
    return out


def check_chunked(q, k, v, sink, window, gamma, chunk: int, correction: str) -> dict:
    """The prompt in chunks of `chunk` queries over the growing keys (the Triton kernels: the Hopper ones refuse
    chunks), each into a NaN-poisoned output; with chunk a multiple of gamma, the chunks against one call's truth."""
    n = q.shape[2]
    kw = dict(sink=sink, window=window, gamma=gamma, correction=correction)
    res = {"check": "chunked", "chunk": chunk, "correction": correction, "aligned": chunk % gamma == 0,
           "nan": False, "kernel_max": 0.0, "torch_max": 0.0}
    outs = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        parts = (q[:, :, s:e], k[:, :, :e], v[:, :, :e])
        out = _launch_chunk(*parts, DeltaPlan(e, sink, window, gamma, correction, start=s, prompt_length=n))
        truth = reference_delta_attention(*(t.double() for t in parts), prompt_length=n, **kw)
        low = reference_delta_attention(*parts, prompt_length=n, **kw)
        res["nan"] |= bool(out.isnan().any())
        res["kernel_max"] = max(res["kernel_max"], max_err(out, truth))
        res["torch_max"] = max(res["torch_max"], max_err(low, truth))
        outs.append(out)
    res["pass"] = not res["nan"] and res["kernel_max"] <= 2 * res["torch_max"]
    if res["aligned"]:
        whole = reference_delta_attention(*(t.double() for t in (q, k, v)), **kw)
        res["one_shot_max"] = max_err(torch.cat(outs, dim=2), whole)
        res["pass"] = res["pass"] and res["one_shot_max"] <= 2 * res["torch_max"]
    return res


def check_varlen(q, k, v, sink, window, gamma) -> dict:
    """Mixed lengths packed into one call: (N_q, N_k, prompt_length) of a whole prompt, a short one (dense), a
    decode step, a last chunk, an earlier chunk of a longer prompt; into a NaN-poisoned packed output."""
    n = q.shape[2]
    seqs = [(n, n, None), (37, 37, None), (1, n // 2 + 1, None), (n // 3, n - 5, None), (n // 4, n // 2, n)]
    kw = dict(sink=sink, window=window, gamma=gamma, correction="delta")
    pieces = [(q[0, :, n_k - n_q:n_k], k[0, :, :n_k], v[0, :, :n_k]) for n_q, n_k, _ in seqs]
    packed_q, packed_k, packed_v = (torch.cat([p[i].transpose(0, 1) for p in pieces]) for i in range(3))
    offsets = [torch.tensor([0] + [sum(s[i] for s in seqs[:j + 1]) for j in range(len(seqs))], dtype=torch.int32,
                            device="cuda") for i in (0, 1)]
    out = torch.full_like(packed_q, float("nan"))
    _by_sequence(packed_q, packed_k, packed_v, out, *offsets, **kw, scale=None,
                 prompt_lengths=[s[2] for s in seqs], launch=LaunchConfig())
    res = {"check": "varlen", "sequences": [list(s[:2]) for s in seqs], "nan": bool(out.isnan().any()),
           "kernel_max": 0.0, "torch_max": 0.0}
    for (lo, hi), (seq_q, seq_k, seq_v), (_, _, length) in zip(zip(offsets[0][:-1].tolist(),
                                                                    offsets[0][1:].tolist()), pieces, seqs):
        parts = (seq_q[None], seq_k[None], seq_v[None])
        truth = reference_delta_attention(*(t.double() for t in parts), prompt_length=length, **kw)
        low = reference_delta_attention(*parts, prompt_length=length, **kw)
        res["kernel_max"] = max(res["kernel_max"], max_err(out[lo:hi].transpose(0, 1)[None], truth))
        res["torch_max"] = max(res["torch_max"], max_err(low, truth))
    res["pass"] = not res["nan"] and res["kernel_max"] <= 2 * res["torch_max"]
    return res


def check_short_queries(q, k, v, sink, window, gamma, n_q) -> dict:
    """The op with the last n_q queries only (inside the rule's dense tail): bottom-right causal attention."""
    n_k = k.shape[2]
    q = q[:, :, n_k - n_q:]
    keep = torch.arange(n_k, device="cuda")[None, :] <= torch.arange(n_q, device="cuda")[:, None] + (n_k - n_q)
    out = delta_attention(q, k, v, sink=sink, window=window, gamma=gamma)
    truth = masked_attention(*(t.double() for t in (q, k, v)), keep)
    return bar_result({"check": "short_queries", "n_q": n_q}, out, truth, masked_attention(q, k, v, keep))


# exact_attention_masked is checked on the first positions only: its float64 truth holds whole score matrices.
MASKED_MAX_N = 2048


def check_exact_masked(q, k, v, padded: bool) -> dict:
    """exact_attention_masked with an exactly causal mask (plain causal SDPA) or a left-padded one (the mask)."""
    q, k, v = (t[:, :, :MASKED_MAX_N] for t in (q, k, v))
    n = q.shape[2]
    keep = torch.ones(n, n, dtype=torch.bool, device="cuda").tril().expand(2, 1, n, n).clone()
    if padded:
        keep[1, :, :, :100] = False
        keep[1, :, torch.arange(100), torch.arange(100)] = True       # padded rows see themselves
    q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))          # batch 2: the second sequence differs
    out = exact_attention_masked(q, k, v, keep, mask_kind="keep")
    truth = masked_attention(*(t.double() for t in (q, k, v)), keep)
    return bar_result({"check": "exact_masked", "padded": padded}, out, truth, masked_attention(q, k, v, keep))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = []
    for n, hq, hkv, d, sink, window, gamma in CASES:
        gen = torch.Generator(device="cuda").manual_seed(n + d)
        base = [torch.randn(1, h, n, d, device="cuda", dtype=torch.float64, generator=gen) for h in (hq, hkv, hkv)]
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = (t.to(dtype) for t in base)
            paths = ["triton"] + (["hopper"] if not hopper_reason(q, k, v, LaunchConfig()) else [])
            checks = [lambda c=c, p=p: check_rule(q, k, v, sink, window, gamma, c, p)
                      for c in CORRECTIONS for p in paths]
            checks += [lambda m=m: check_short_queries(q, k, v, sink, window, gamma, m) for m in SHORT_QUERIES]
            checks += [lambda p=p: check_batch(q, k, v, sink, window, gamma, p) for p in paths]
            checks += [lambda c=c, m=m: check_chunked(q, k, v, sink, window, gamma, m, c)
                       for m in (4 * gamma, 1024 - 1024 % gamma, 777) for c in ("delta", "recompute")]
            checks += [lambda: check_varlen(q, k, v, sink, window, gamma)]
            checks += [lambda p=p: check_exact_masked(q, k, v, p) for p in (False, True)]
            for check in checks:
                res = {"n": n, "hq": hq, "hkv": hkv, "d": d, "dtype": str(dtype), **check()}
                results.append(res)
                print(json.dumps(res), flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": header(), "cases": results}, f, indent=1)
    print(f"\n{'check':<14} {'variant':<10} pass")
    for check, key in (("rule", "correction"), ("rule", "path"), ("short_queries", "n_q"), ("exact_masked", "padded"),
                       ("batch", "path"), ("chunked", "chunk"), ("chunked", "correction"), ("varlen", "check")):
        for variant in sorted({str(r[key]) for r in results if r["check"] == check}):
            group = [r for r in results if r["check"] == check and str(r[key]) == variant]
            print(f"{check:<14} {variant:<10} {sum(r['pass'] for r in group)}/{len(group)}")
    failed = [r for r in results if not r["pass"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} cases pass")
    for r in failed:
        print("FAIL", r)


if __name__ == "__main__":
    main()
