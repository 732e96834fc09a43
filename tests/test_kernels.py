"""The Triton kernels (run by Triton's interpreter on CPU) against the float64 reference of the rule."""
from __future__ import annotations

import dataclasses
import importlib
import math
import zlib
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from deltapass.kernels import DeltaPlan, LaunchConfig, delta_attention, reference_delta_attention, sparse_keep
from deltapass.kernels.op import _interpreting
from deltapass.kernels.triton_delta import (_anchor_sample, _causal_chunk_segments, _dense_row_is_sample,
                                            _dense_row_position, _dense_segments, _is_sample_row, _key_tile,
                                            _key_tiles, _sparse_segments, _tile_keep, launch_delta_attention)

from helpers import max_abs_err, random_qkv

pytestmark = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")

# (N, Hq, Hkv, D, sink, window, gamma, launch): odd N, GQA 1:1, 3:1, 4:1, 8:1, sink 0,
# window >= N, gamma not dividing N or the tiles, padded head dims, several tile shapes.
# (Under delta/recompute/tail every row of N=97 is a tail row, so that case checks sparse rows in "none" only.)
CASES = {
    "n97-mha": (97, 2, 2, 64, 4, 16, 8, LaunchConfig(32, 16, 4, 1, 16, 16, 4, 1)),
    "n1000-gqa3": (1000, 9, 3, 64, 16, 64, 48, LaunchConfig(128, 64, 4, 1, 64, 64, 4, 1)),
    "n4099-gqa4": (4099, 4, 1, 64, 64, 256, 64, LaunchConfig(256, 64, 4, 1, 128, 128, 4, 1)),
    "n300-gqa8-sink0": (300, 8, 1, 64, 0, 32, 16, LaunchConfig(64, 16, 4, 1, 64, 32, 4, 1)),
    "n200-window-ge-n": (200, 4, 2, 64, 0, 512, 16, LaunchConfig(32, 32, 4, 1, 32, 32, 4, 1)),
    "n333-d80-gamma100": (333, 3, 1, 80, 8, 40, 100, LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1)),
    "n260-d96-sink-only": (260, 2, 1, 96, 24, 0, 32, LaunchConfig(16, 16, 4, 1, 16, 16, 4, 1)),
    "n150-gamma1": (150, 2, 1, 128, 4, 8, 1, LaunchConfig(32, 32, 4, 1, 32, 32, 4, 1)),
    "n181-d256-gqa2": (181, 4, 2, 256, 8, 16, 16, LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1)),
}


def run_poisoned(q, k, v, sink, window, gamma, correction, launch, prompt_length=None):
    """Run both kernels into NaN-filled output and workspace so unwritten rows show (q: the last N_q of k's
    positions, of a prompt_length-token prompt)."""
    plan = DeltaPlan(k.shape[2], sink, window, gamma, correction, start=k.shape[2] - q.shape[2],
                     prompt_length=prompt_length)
    out = torch.full_like(q, float("nan"))
    delta = torch.full((q.shape[0], q.shape[1], max(plan.n_samples, 1), q.shape[3]), float("nan"))
    launch_delta_attention(q, k, v, out, plan, 1.0 / math.sqrt(q.shape[-1]), launch, delta=delta)
    return out


def exact_rows(plan: DeltaPlan) -> torch.Tensor:
    """Rows the rule computes with dense attention."""
    if plan.exact:
        return torch.arange(plan.n)
    return plan.dense_row_positions()


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_fp64_reference(case, correction):
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    seed = zlib.crc32(f"{case}/{correction}".encode())   # the same inputs in every process (hash() is salted)
    q, k, v = random_qkv(1, hq, hkv, n, d, torch.float32, seed)
    out = run_poisoned(q, k, v, sink, window, gamma, correction, launch)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), sink=sink, window=window,
                                      gamma=gamma, correction=correction)
    assert not out.isnan().any(), "some output rows were never written"
    assert max_abs_err(out, truth) < 2e-5


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] in (64, 128)])
def test_pointer_loads_match_fp64_reference(case):
    """The plain-pointer K/V path (used where tensor descriptors cannot be) obeys the same rule."""
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    q, k, v = random_qkv(1, hq, hkv, n, d, torch.float32, seed=99 + n)
    out = run_poisoned(q, k, v, sink, window, gamma, "delta", dataclasses.replace(launch, kv_tma=-1))
    truth = reference_delta_attention(q.double(), k.double(), v.double(), sink=sink, window=window,
                                      gamma=gamma, correction="delta")
    assert not out.isnan().any()
    assert max_abs_err(out, truth) < 2e-5


FP16_CASES = ([(case, correction) for correction in ("delta", "recompute")
               for case in ("n1000-gqa3", "n97-mha", "n200-window-ge-n", "n333-d80-gamma100")]
              + [(case, "tail") for case in ("n1000-gqa3", "n97-mha", "n200-window-ge-n")])


@pytest.mark.parametrize("case,correction", FP16_CASES)
def test_fp16_within_flash_criterion(case, correction):
    """Exact rows: error vs fp64 <= 2x PyTorch's own fp16 error; other rows held to the same bound."""
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    q, k, v = random_qkv(2, hq, hkv, n, d, torch.float16, seed=1234 + n)
    out = run_poisoned(q, k, v, sink, window, gamma, correction, launch)
    kwargs = dict(sink=sink, window=window, gamma=gamma, correction=correction)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    torch_fp16 = reference_delta_attention(q, k, v, **kwargs)
    assert not out.isnan().any()
    rows = exact_rows(DeltaPlan(n, sink, window, gamma, correction))
    assert rows.numel() > 0
    kernel_err = max_abs_err(out[:, :, rows], truth[:, :, rows])
    torch_err = max_abs_err(torch_fp16[:, :, rows], truth[:, :, rows])
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)
    assert max_abs_err(out, truth) <= 2 * max_abs_err(torch_fp16, truth)


def test_batched_strided_inputs_and_op_entry():
    """The public op on non-contiguous [B, N, H, D]-transposed inputs equals the reference."""
    n, hq, hkv, d = 130, 6, 2, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    kwargs = dict(sink=4, window=24, gamma=12, correction="delta")
    out = delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.stride() == q.stride()     # [B, N, H, D] order, as the model's transpose back reads it
    assert max_abs_err(out, truth) < 2e-5


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("n_q", [130, 37])
def test_output_follows_q_layout_on_every_path(n_q, kernels, monkeypatch):
    """The op's output takes q's strides on every path (the kernels, the float32 reference, decode's exact
    attention) and its fake impl says the same; a q whose head dim is strided gets a contiguous output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deltapass.kernels import op

    if not kernels:
        monkeypatch.setattr(op, "_interpreting", lambda: False)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, n_q, 4, 64, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, 130, 2, 64, generator=gen).transpose(1, 2) for _ in range(2))
    kwargs = dict(sink=4, window=24, gamma=12, correction="delta")
    out = delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    assert out.stride() == q.stride() == op.output_like(q).stride()
    with FakeTensorMode() as mode:
        fake = torch.ops.deltapass.delta_attention.default(*(mode.from_tensor(t) for t in (q, k, v)), 4, 24, 12,
                                                           "delta", None)
    assert fake.stride() == out.stride()
    truth = (reference_delta_attention(q.double(), k.double(), v.double(), **kwargs) if n_q == 130
             else bottom_right_truth(q, k, v))
    assert max_abs_err(out, truth) < 2e-5
    assert op.output_like(torch.randn(1, 4, 64, n_q).transpose(2, 3)).is_contiguous()


def test_custom_scale():
    q, k, v = random_qkv(1, 2, 1, 90, 64, torch.float32, seed=3)
    kwargs = dict(sink=2, window=10, gamma=8, correction="delta", scale=0.3)
    out = delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    assert max_abs_err(out, truth) < 2e-5


@triton.jit
def _row_helpers_probe(Out, n_rows, n_samples, gamma, start, tail_start, BLOCK: tl.constexpr):
    """Evaluate the kernels' row helpers on dense rows 0..n_rows-1 and on positions start..start+n_rows-1:
    four int32 rows of Out."""
    r = tl.arange(0, BLOCK)
    ok = r < n_rows
    tl.store(Out + r, _dense_row_position(r, n_samples, gamma, start, tail_start), mask=ok)
    tl.store(Out + BLOCK + r, _dense_row_is_sample(r, n_samples).to(tl.int32), mask=ok)
    tl.store(Out + 2 * BLOCK + r, _is_sample_row(start + r, gamma, start).to(tl.int32), mask=ok)
    tl.store(Out + 3 * BLOCK + r, _anchor_sample(start + r, gamma, start), mask=ok)


@pytest.mark.parametrize("plan", [
    DeltaPlan(1000, 16, 64, 48, "delta"), DeltaPlan(1000, 16, 64, 48, "recompute"), DeltaPlan(1000, 16, 64, 48, "tail"),
    DeltaPlan(4099, 64, 256, 64, "delta"), DeltaPlan(333, 8, 40, 100, "delta"), DeltaPlan(150, 4, 8, 1, "recompute"),
    DeltaPlan(300, 0, 32, 16, "none"),
    # chunks: aligned and misaligned starts, an earlier chunk (no tail), the last chunk (tail), decode
    DeltaPlan(600, 16, 64, 48, "delta", start=240, prompt_length=1000),
    DeltaPlan(611, 16, 64, 48, "delta", start=250, prompt_length=1000),
    DeltaPlan(1000, 16, 64, 48, "recompute", start=777), DeltaPlan(1000, 16, 64, 48, "delta", start=999),
    DeltaPlan(700, 16, 64, 48, "tail", start=333, prompt_length=900),
], ids=repr)
def test_device_row_helpers_mirror_the_plan(plan):
    """Each jit helper that places rows on the device equals the DeltaPlan member its docstring names."""
    n_dense, n_sparse = plan.dense_kernel_rows, plan.sparse_kernel_rows
    block = triton.next_power_of_2(max(n_dense, n_sparse, 16))
    out = torch.full((4, block), -1, dtype=torch.int32)
    _row_helpers_probe[(1,)](out, max(n_dense, n_sparse), plan.n_samples, plan.gamma, plan.start, plan.tail_start,
                             BLOCK=block)
    dense = torch.arange(n_dense)
    positions = plan.dense_row_position(dense)
    assert torch.equal(out[0, :n_dense].long(), positions)
    assert torch.equal(out[1, :n_dense].bool(), plan.is_sample_row(positions))
    assert torch.equal(positions, plan.dense_row_positions())
    rows = plan.start + torch.arange(n_sparse)          # the sparse kernel's rows
    if plan.sparse_kernel_skips_samples:
        assert torch.equal(out[2, :n_sparse].bool(), plan.is_sample_row(rows))
    if plan.carries_delta:
        assert torch.equal(out[3, :n_sparse].long(), plan.anchor_sample(rows))
        assert torch.equal(plan.dense_row_positions()[plan.anchor_sample(rows)], plan.anchor_row(rows))


@triton.jit
def _key_loop_probe(Out, pmin, pmax, sink, window, n_keys, chunk_keys, MODE: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_N: tl.constexpr, N: tl.constexpr):
    """Out[r, j] += 1 for every key j the kernels' key loop lets row pmin + r see: whole tiles in full,
    edge tiles through _tile_keep (the segments and tiles are the kernels' own helpers). MODE 0: sparse
    rows; 1: the Triton kernel's dense rows; 2: the Hopper dense rows, chunk by chunk of chunk_keys keys."""
    rows = tl.arange(0, ROWS)
    t = tl.minimum(pmin + rows, pmax)[:, None]
    offs_n = tl.arange(0, BLOCK_N)[None, :]
    n_chunks = 1
    if MODE == 2:
        n_chunks = tl.cdiv(pmax + 1, chunk_keys)
    for c in range(0, n_chunks):
        if MODE == 0:
            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(pmin, pmax, sink, window, BLOCK_N)
            keep_window = window
        elif MODE == 1:  # the Triton kernel's dense rows: a window of all keys
            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _dense_segments(pmin, pmax, BLOCK_N)
            keep_window = n_keys
        else:
            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _causal_chunk_segments(pmin, pmax, c * chunk_keys,
                                                                                    chunk_keys, BLOCK_N)
            keep_window = n_keys
        n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
        for i in range(0, n_tiles):
            start, in_a, edge = _key_tile(i, n_a, b_tile_lo, a_full, b_full_lo, b_full_hi, BLOCK_N)
            keep = tl.where(edge, _tile_keep(t, start, offs_n, in_a, a_hi, b_lo, b_hi, keep_window),
                            (t >= 0) & (offs_n >= 0))
            j = start + offs_n
            tl.atomic_add(Out + rows[:, None] * N + j, keep.to(tl.int32), mask=j < N)


# (pmin, pmax, sink, window, BLOCK_N): rows below the sinks, the paper config, odd sizes, window 0 and 1, sink 0.
KEY_LOOPS = [(0, 31, 1024, 2048, 128), (4000, 4031, 1024, 2048, 128), (5000, 5127, 17, 300, 64),
             (130, 160, 0, 64, 32), (100, 140, 20, 0, 16), (700, 731, 64, 1, 32), (3, 9, 3, 7, 16), (40, 47, 64, 8, 16)]


@pytest.mark.parametrize("mode, chunk_tiles", [(0, 0), (1, 0), (2, 1), (2, 3), (2, 1000)])
@pytest.mark.parametrize("pmin, pmax, sink, window, block_n", KEY_LOOPS)
def test_device_key_loop_keeps_exactly_the_rules_keys(mode, chunk_tiles, pmin, pmax, sink, window, block_n):
    """Each key once for the rows that keep it (rule.sparse_keep; dense rows: causal, whole or in key chunks
    of chunk_tiles tiles), none past the diagonal."""
    rows, n = triton.next_power_of_2(pmax - pmin + 1), pmax + 1 + 2 * block_n
    out = torch.zeros(rows, n, dtype=torch.int32)
    _key_loop_probe[(1,)](out, pmin, pmax, sink, window, n, chunk_tiles * block_n, MODE=mode, ROWS=rows,
                          BLOCK_N=block_n, N=n)
    t, j = torch.arange(pmin, pmax + 1)[:, None], torch.arange(n)[None, :]
    want = sparse_keep(t, j, 0, n) if mode else sparse_keep(t, j, sink, window)
    assert torch.equal(out[:pmax - pmin + 1], want.to(torch.int32))


@triton.jit
def _tile_count_probe(Out, pmin, pmax, sink, window, chunk_keys, BLOCK_N: tl.constexpr):
    """The kernels' key-tile counts (their own helpers): Out[0] of a sparse item over rows pmin..pmax,
    Out[1 + c] of the dense rows' key chunk c."""
    a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(pmin, pmax, sink, window, BLOCK_N)
    n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
    tl.store(Out, n_tiles)
    for c in range(0, tl.cdiv(pmax + 1, chunk_keys)):
        a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _causal_chunk_segments(pmin, pmax, c * chunk_keys,
                                                                                chunk_keys, BLOCK_N)
        n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
        tl.store(Out + 1 + c, n_tiles)


@pytest.mark.parametrize("chunk_tiles", [1, 3, 1000])
@pytest.mark.parametrize("pmin, pmax, sink, window, block_n", KEY_LOOPS)
def test_work_model_counts_the_kernels_key_tiles(chunk_tiles, pmin, pmax, sink, window, block_n, monkeypatch):
    """benchmarks/work_model.py restates the launches' tile counts for BENCHMARKS.md's analysis: it must count
    what the kernels' helpers count."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    work_model = importlib.import_module("work_model")
    chunk = chunk_tiles * block_n
    want = work_model.chunk_tiles(pmax, chunk, block_n)
    out = torch.full((2 + len(want),), -1, dtype=torch.int32)
    _tile_count_probe[(1,)](out, pmin, pmax, sink, window, chunk, BLOCK_N=block_n)
    assert out[0].item() == work_model.sparse_tiles(pmin, pmax, sink, window, block_n)
    assert out[1:].tolist() == want + [-1]


def test_op_under_torch_compile_and_opcheck():
    """The custom op's fake impl lets torch.compile carry it; opcheck validates its registration."""
    q, k, v = random_qkv(1, 4, 2, 70, 64, torch.float32, seed=11)
    launch = LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1).to_dict()
    args = (q, k, v, 4, 16, 8, "delta", None)
    torch.library.opcheck(torch.ops.deltapass.delta_attention.default, args, launch)
    transposed = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))   # a model's layout
    torch.library.opcheck(torch.ops.deltapass.delta_attention.default, transposed + args[3:], launch)

    def f(q, k, v):
        return torch.ops.deltapass.delta_attention.default(q, k, v, 4, 16, 8, "delta", None, **launch) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    truth = 2 * reference_delta_attention(q.double(), k.double(), v.double(), sink=4, window=16, gamma=8)
    assert max_abs_err(compiled(q, k, v), truth) < 4e-5


def test_launch_parameters_cross_the_schema_by_name():
    """The op's keyword-only arguments are LaunchConfig's fields, and each reaches the field of its name."""
    schema = torch.ops.deltapass.delta_attention.default._schema
    keyword = [a for a in schema.arguments if a.kwarg_only]
    assert [a.name for a in keyword] == [f.name for f in dataclasses.fields(LaunchConfig)]
    assert all(a.default_value == 0 for a in keyword)
    q, k, v = random_qkv(1, 2, 1, 40, 64, torch.float32, seed=12)
    for name, bad in (("dense_block_n", 24), ("num_stages", 9), ("kv_tma", 2)):
        with pytest.raises(ValueError, match=rf"launch parameter {name} must .* got {bad}"):
            torch.ops.deltapass.delta_attention.default(q, k, v, 4, 16, 8, "delta", None, **{name: bad})


def bottom_right_truth(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64, whole matrix: query i sees keys j <= N_k - N_q + i; K/V expanded per query head."""
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("n_q", [1, 37])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_shorter_queries_attend_bottom_right(n_q, hq, hkv):
    """Decode (N_q = 1) and a last chunk (N_q = 37) of a 300-token prompt: queries at the end of the keys,
    and inside the rule's dense tail (300 % 4 + 128 rows), so exact."""
    q, _, _ = random_qkv(1, hq, hkv, n_q, 64, torch.float32, seed=20 + n_q)
    _, k, v = random_qkv(1, hq, hkv, 300, 64, torch.float32, seed=21 + hq)
    out = delta_attention(q, k, v, sink=2, window=8, gamma=4)
    truth = bottom_right_truth(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert max_abs_err(out, truth) < 2e-5
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_abs_err(top_left, truth) > 0.1            # what the op used to return


def test_more_queries_than_keys_is_refused():
    q, _, _ = random_qkv(1, 4, 2, 40, 64, torch.float32, seed=23)
    _, k, v = random_qkv(1, 4, 2, 30, 64, torch.float32, seed=24)
    with pytest.raises(ValueError, match=r"N_q=40 must be <= key length N_k=30"):
        delta_attention(q, k, v, sink=2, window=8, gamma=4)
    with pytest.raises(ValueError, match=r"N_q=40 must be <= key length N_k=30"):
        torch.ops.deltapass.delta_attention.default(q, k, v, 2, 8, 4, "delta", None)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("correction,spread", [("delta", 16), ("recompute", 1)])
def test_nan_at_a_sample_row_spreads_to_the_rows_that_take_its_delta(correction, spread):
    """The rule, not a kernel bug: under "delta" a sample row's delta reaches its whole gamma block."""
    n, gamma, poisoned = 200, 16, 32                    # s_p = 200 - (200 % 16 + 128) = 64: row 32 is a sample row
    q, k, v = random_qkv(1, 4, 2, n, 64, torch.float32, seed=31)
    q[0, 1, poisoned, 5] = float("nan")
    kwargs = dict(sink=4, window=24, gamma=gamma, correction=correction)
    for out in (delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16),
                reference_delta_attention(q, k, v, **kwargs)):
        bad = (~out.isfinite()).any(dim=-1)            # [B, Hq, N]
        assert bad[0, 1].nonzero().flatten().tolist() == list(range(poisoned, poisoned + spread))
        assert not bad[0, [0, 2, 3]].any()             # other heads, the same K/V head included


# (N, Hq, Hkv, sink, window, gamma, chunk sizes, launch): odd N, GQA 1:1, 3:1, 4:1; chunks that are multiples of
# gamma (they must give the one-shot rows) and misaligned ones (the reference's defined rows).
CHUNKED = {
    "n403-gqa3": (403, 9, 3, 8, 24, 16, [16, 96, 160, 48 * 7], LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1)),
    "n333-mha-misaligned": (333, 2, 2, 4, 16, 12, [50, 111], LaunchConfig(32, 16, 4, 1, 16, 32, 4, 1)),
    "n290-gqa4": (290, 4, 1, 0, 32, 24, [24, 120, 77], LaunchConfig(64, 32, 4, 1, 32, 16, 4, 1)),
}


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("case", list(CHUNKED))
def test_chunked_prefill_under_the_interpreter(case, correction):
    """Chunk after chunk over the growing keys, each into a NaN-poisoned output: every chunk equals the float64
    reference of its rows, and with boundaries at multiples of gamma the chunks make the one-shot result."""
    n, hq, hkv, sink, window, gamma, sizes, launch = CHUNKED[case]
    q, k, v = random_qkv(1, hq, hkv, n, 64, torch.float32, seed=hash((case, correction)) % 2**31)
    kw = dict(sink=sink, window=window, gamma=gamma, correction=correction)
    one_shot = reference_delta_attention(q.double(), k.double(), v.double(), **kw)
    for size in sizes:
        chunks = []
        for s in range(0, n, size):
            e = min(n, s + size)
            out = run_poisoned(q[:, :, s:e], k[:, :, :e], v[:, :, :e], sink, window, gamma, correction, launch,
                               prompt_length=n)
            truth = reference_delta_attention(q[:, :, s:e].double(), k[:, :, :e].double(), v[:, :, :e].double(),
                                              prompt_length=n, **kw)
            assert not out.isnan().any(), f"chunk [{s}, {e}): some rows were never written"
            assert max_abs_err(out, truth) < 2e-5, (s, e)
            chunks.append(out)
        if size % gamma == 0:
            assert max_abs_err(torch.cat(chunks, dim=2), one_shot) < 2e-5, size


def test_a_chunk_beyond_the_tail_gets_the_rules_rows_not_exact_attention():
    """The op's default for N_q < N_k: the rows of the rule over an N_k-token prompt (it used to return exact
    attention for them); an earlier chunk, told the prompt goes on, has no tail rows."""
    q, k, v = random_qkv(1, 6, 2, 500, 64, torch.float32, seed=41)
    kw = dict(sink=4, window=24, gamma=16, correction="delta")
    tiles = dict(block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    last = delta_attention(q[:, :, 192:], k, v, **kw, **tiles)           # 192: a multiple of gamma
    one_shot = reference_delta_attention(q.double(), k.double(), v.double(), **kw)
    assert max_abs_err(last, one_shot[:, :, 192:]) < 2e-5
    assert max_abs_err(last, bottom_right_truth(q[:, :, 192:], k, v)) > 1e-2
    first = delta_attention(q[:, :, :320], k[:, :, :320], v[:, :, :320], **kw, **tiles, prompt_length=500)
    assert max_abs_err(first, one_shot[:, :, :320]) < 2e-5
    alone = reference_delta_attention(q[:, :, :320].double(), k[:, :, :320].double(), v[:, :, :320].double(), **kw)
    assert max_abs_err(first, alone) > 1e-2         # as a whole prompt, its last 128 rows would be its tail


@pytest.mark.parametrize("bad, match", [
    (299, r"prompt_length must be >= the key length N_k=300 .* got prompt_length=299"),
    (300.5, r"prompt_length must be an int or None, got prompt_length=300.5"),
])
def test_a_bad_prompt_length_is_refused_by_name(bad, match):
    q, k, v = random_qkv(1, 4, 2, 300, 64, torch.float32, seed=42)
    with pytest.raises(ValueError, match=match):
        delta_attention(q[:, :, 100:], k, v, sink=2, window=8, gamma=4, prompt_length=bad)
    if isinstance(bad, int):
        with pytest.raises(ValueError, match=match):
            torch.ops.deltapass.delta_attention.default(q[:, :, 100:], k, v, 2, 8, 4, "delta", None, bad)
