"""The exact reference of the rule, checked against the rule's words and an independent full-matrix build."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from deltapass.kernels import DeltaPlan, anchor_row, reference_delta_attention, sample_row, sparse_keep, tail_row

from helpers import max_abs_err, random_qkv


def test_plan_rows_follow_the_rule():
    plan = DeltaPlan(1000, 16, 64, 48, "delta")
    assert plan.tail == 1000 % 48 + 128 == 168
    assert plan.sparse_end == 832
    assert plan.n_samples == 18                       # rows 0, 48, ..., 816 < 832
    positions = plan.dense_row_positions()
    assert positions[:18].tolist() == list(range(0, 832, 48))
    assert positions[18:].tolist() == list(range(832, 1000))
    assert DeltaPlan(1000, 16, 64, 256, "delta").tail == 1000 % 256 + 256
    assert DeltaPlan(100, 16, 64, 64, "delta").sparse_end == 0   # tail capped at N: all dense
    none = DeltaPlan(1000, 16, 64, 48, "none")
    assert (none.tail, none.n_samples, none.sparse_end) == (0, 0, 1000)
    assert DeltaPlan(80, 16, 64, 48, "none").exact and DeltaPlan(80, 16, 64, 48, "none").tail == 80
    tail = DeltaPlan(1000, 16, 64, 48, "tail")
    assert (tail.tail, tail.n_samples, tail.sparse_end) == (168, 0, 832)
    assert tail.dense_row_positions().tolist() == list(range(832, 1000))
    assert not tail.carries_delta and not tail.sparse_kernel_skips_samples


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
def test_row_predicates_follow_the_words_of_the_rule(correction):
    plan = DeltaPlan(1000, 16, 64, 48, correction)
    sampled = correction in ("delta", "recompute")
    for t in range(plan.n):
        assert bool(plan.is_tail_row(t)) == (t >= plan.sparse_end) == bool(tail_row(t, plan.sparse_end))
        assert bool(plan.is_sample_row(t)) == (sampled and t < plan.sparse_end and t % 48 == 0)
        assert plan.anchor_row(t) == anchor_row(t, 48) == 48 * (t // 48)
        if t < plan.sparse_end:                      # every row below s_p has a sample row as anchor
            assert bool(plan.is_sample_row(plan.anchor_row(t))) == sampled
    rows = torch.arange(plan.n)
    assert torch.equal(plan.is_sample_row(rows), torch.tensor([bool(sample_row(t, 48, plan.n_samples))
                                                               for t in range(plan.n)]))


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("n,sink,window,gamma", [(700, 30, 50, 32), (411, 0, 17, 5), (90, 40, 60, 8)])
def test_attended_keys_count_the_rule_mask_by_mask(n, sink, window, gamma, correction):
    """FLOP count of the rule: sparse keys of rows that compute a sparse result, causal keys of dense rows."""
    plan = DeltaPlan(n, sink, window, gamma, correction)
    t, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sparse_keys, dense_keys = sparse_keep(t, j, sink, window).sum(1), (j <= t).sum(1)
    sparse_total = dense_total = 0
    for row in range(n):
        dense = row >= plan.sparse_end or (correction in ("delta", "recompute") and row % gamma == 0)
        if dense:
            dense_total += int(dense_keys[row])
        if row < plan.sparse_end and (not dense or correction == "delta"):
            sparse_total += int(sparse_keys[row])
    assert plan.attended_keys() == (sparse_total, dense_total)


def test_sparse_mask_matches_the_words_of_the_rule():
    n, sink, window = 40, 3, 7
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = sparse_keep(t, j, sink, window)
    for row in range(n):
        for key in range(n):
            expected = key <= row and (key < sink or row - key < window)
            assert bool(mask[row, key]) == expected


def full_matrix_rule(q, k, v, sink, window, gamma, correction, start=0, prompt_length=None):
    """Independent build: whole N x N masks, expanded K/V, then the rule's composition row by row, in the
    words of the rule (rule.py): s_p from the prompt's length; in a chunk [start, N), row `start` is a sample
    row too and anchors the rows of its gamma block. q, k, v: the prompt's first N rows; returns rows start.."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    length = n if prompt_length is None else prompt_length
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=sparse_keep(t, j, sink, window))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if length <= sink + window:
        return dense[:, :, start:]
    s_p = length if correction == "none" else length - min(length, length % gamma + max(128, gamma))
    out = sparse.clone()
    for row in range(start, n):
        anchor = max(start, row // gamma * gamma)
        sample = correction in ("delta", "recompute") and (row % gamma == 0 or row == start)
        if row >= s_p or sample:
            out[:, :, row] = dense[:, :, row]
        elif correction == "delta":
            out[:, :, row] = sparse[:, :, row] + dense[:, :, anchor] - sparse[:, :, anchor]
    return out[:, :, start:]


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("n,hq,hkv,sink,window,gamma", [
    (700, 6, 2, 300, 40, 32),     # sink wider than one reference chunk
    (611, 4, 4, 0, 100, 50),
    (300, 8, 1, 5, 1, 7),
    (129, 3, 3, 200, 10, 16),     # N <= sink + window: exact
])
def test_reference_matches_full_matrix_build(n, hq, hkv, sink, window, gamma, correction):
    q, k, v = random_qkv(1, hq, hkv, n, 64, torch.float64, seed=n * 7 + sink)
    ours = reference_delta_attention(q, k, v, sink=sink, window=window, gamma=gamma, correction=correction)
    truth = full_matrix_rule(q, k, v, sink, window, gamma, correction)
    assert max_abs_err(ours, truth) < 1e-12


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("start,n,prompt_length,gamma", [
    (96, 288, 700, 32),      # an earlier chunk, aligned: no tail rows
    (100, 333, 700, 32),     # misaligned both ends
    (500, 700, None, 32),    # the last chunk: the tail falls in it
    (530, 700, 700, 48),     # misaligned start inside the tail's reach (s_p = 700 - 620 % 48 - 128)
    (699, 700, None, 7),     # decode: a tail row, exact
    (0, 250, 700, 25),       # the first chunk
    (40, 77, 80, 16),        # prompt_length <= sink + window: dense
])
def test_chunk_rows_match_full_matrix_build(start, n, prompt_length, gamma, correction):
    q, k, v = random_qkv(1, 6, 2, n, 64, torch.float64, seed=start + n)
    ours = reference_delta_attention(q[:, :, start:], k, v, sink=20, window=70, gamma=gamma, correction=correction,
                                     prompt_length=prompt_length)
    truth = full_matrix_rule(q, k, v, 20, 70, gamma, correction, start, prompt_length)
    assert ours.shape == q[:, :, start:].shape
    assert max_abs_err(ours, truth) < 1e-12


@pytest.mark.parametrize("correction", ["delta", "recompute", "tail", "none"])
@pytest.mark.parametrize("chunk", [64, 192, 320, 703])
def test_chunks_at_multiples_of_gamma_equal_one_call(chunk, correction):
    """A prefill in chunks whose boundaries are multiples of gamma gives the one-shot rows (odd N, GQA 3:1)."""
    n = 703
    q, k, v = random_qkv(1, 9, 3, n, 64, torch.float64, seed=chunk)
    kw = dict(sink=16, window=64, gamma=32, correction=correction)
    one_shot = reference_delta_attention(q, k, v, **kw)
    chunks = [reference_delta_attention(q[:, :, s:s + chunk], k[:, :, :s + chunk], v[:, :, :s + chunk],
                                        prompt_length=n, **kw) for s in range(0, n, chunk)]
    assert max_abs_err(torch.cat(chunks, dim=2), one_shot) < 1e-12


def test_a_misaligned_chunk_differs_from_one_call_only_in_its_first_gamma_block():
    """The defined exception: a chunk starting at 100 (gamma 32) makes row 100 a sample row and anchors rows
    101..127 there (in one call: row 96); every later row is the one-shot row."""
    n, start = 703, 100
    q, k, v = random_qkv(1, 4, 2, n, 64, torch.float64, seed=3)
    kw = dict(sink=16, window=64, gamma=32, correction="delta")
    one_shot = reference_delta_attention(q, k, v, **kw)[:, :, start:]
    chunk = reference_delta_attention(q[:, :, start:], k, v, **kw)
    differs = ((chunk - one_shot).abs().amax(dim=(0, 1, 3)) > 1e-12).nonzero().flatten() + start
    assert differs.tolist() == list(range(100, 128))      # row 100 is dense, rows 101..127 take its delta


def test_chunk_plan_counts_the_chunks_rows():
    plan = DeltaPlan(333, 16, 64, 32, "delta", start=100, prompt_length=700)
    assert plan.sparse_end == 700 - (700 % 32 + 128) == 544
    assert (plan.rows, plan.tail, plan.tail_start, plan.n_samples) == (233, 0, 333, 8)
    assert plan.dense_row_positions().tolist() == [100, 128, 160, 192, 224, 256, 288, 320]
    assert plan.anchor_row(127) == 100 and plan.anchor_row(128) == 128 and plan.anchor_sample(127) == 0
    assert plan.is_sample_row(100) and not plan.is_sample_row(96) and not plan.is_sample_row(101)
    last = DeltaPlan(700, 16, 64, 32, "delta", start=500)
    assert (last.tail, last.tail_start, last.n_samples, last.sparse_kernel_rows) == (156, 544, 2, 44)
    assert last.dense_row_positions()[:3].tolist() == [500, 512, 544]
    decode = DeltaPlan(700, 16, 64, 32, "delta", start=699)
    assert (decode.tail, decode.n_samples, decode.sparse_kernel_rows) == (1, 0, 0)
    assert DeltaPlan(333, 16, 64, 32, "delta", start=100, prompt_length=333) == DeltaPlan(333, 16, 64, 32, "delta",
                                                                                            start=100)


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=0, prompt_length=299), r"prompt_length must be >= the key length N_k=300 .* got prompt_length=299"),
    (dict(start=0, prompt_length=300.0), r"prompt_length must be an int or None, got prompt_length=300.0"),
    (dict(start=0, prompt_length=True), r"prompt_length must be an int or None, got prompt_length=True"),
    (dict(start=0, prompt_length=2**31), r"prompt_length must be <= 2\*\*31 - 1 .* got prompt_length=2147483648"),
    (dict(start=300), r"start must be in \[0, N\) .* got start=300, N=300"),
    (dict(start=-1), r"start must be in \[0, N\) .* got start=-1"),
])
def test_plan_refuses_rows_outside_the_prompt(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaPlan(300, 4, 8, 8, "delta", **kwargs)


def test_short_sequence_is_dense_attention():
    q, k, v = random_qkv(2, 4, 2, 90, 64, torch.float64, seed=5)
    out = reference_delta_attention(q, k, v, sink=10, window=80, gamma=8, correction="delta")
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_abs_err(out, dense) < 1e-12


def test_cpu_exact_path_without_interpreter():
    """Without TRITON_INTERPRET, CPU tensors take the float32 PyTorch path of the same rule."""
    code = """
import torch
from deltapass.kernels import delta_attention, reference_delta_attention
from deltapass.kernels.op import _interpreting
assert not _interpreting()
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 9, 700, 64, generator=g).half()
k = torch.randn(1, 3, 700, 64, generator=g).half()
v = torch.randn(1, 3, 700, 64, generator=g).half()
kw = dict(sink=16, window=64, gamma=32, correction="delta")
out = delta_attention(q, k, v, **kw)
truth = reference_delta_attention(q.double(), k.double(), v.double(), **kw)
assert out.dtype == torch.float16 and out.shape == q.shape
err = (out.double() - truth).abs().max().item()
assert err < 2e-3, err
tail = delta_attention(q, k, v, **{**kw, "correction": "tail"})
truth = reference_delta_attention(q.double(), k.double(), v.double(), **{**kw, "correction": "tail"})
assert (tail.double() - truth).abs().max().item() < 2e-3
step = delta_attention(q[:, :, -1:], k, v, **kw)      # decode: the last query sees every key
dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                         enable_gqa=True)
assert (step.double() - dense[:, :, -1:]).abs().max().item() < 2e-3
chunk = delta_attention(q[:, :, 320:640], k[:, :, :640], v[:, :, :640], prompt_length=700, **kw)
one_shot = reference_delta_attention(q.double(), k.double(), v.double(), **kw)[:, :, 320:640]
assert (chunk.double() - one_shot).abs().max().item() < 2e-3
assert (chunk.double() - dense[:, :, 320:640]).abs().max().item() > 1e-2     # not exact attention
print("ok", err)
"""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
