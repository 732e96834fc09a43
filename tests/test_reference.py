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


def full_matrix_rule(q, k, v, sink, window, gamma, correction):
    """Independent build: whole N x N masks, expanded K/V, then the rule's composition row by row."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sparse = F.scaled_dot_product_attention(q, k, v, attn_mask=sparse_keep(t, j, sink, window))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    plan = DeltaPlan(n, sink, window, gamma, correction)
    if plan.exact:
        return dense
    out = sparse.clone()
    for row in range(n):
        anchor = row // gamma * gamma
        if row >= plan.sparse_end or (correction in ("delta", "recompute") and row % gamma == 0):
            out[:, :, row] = dense[:, :, row]
        elif correction == "delta":
            out[:, :, row] = sparse[:, :, row] + dense[:, :, anchor] - sparse[:, :, anchor]
    return out


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
print("ok", err)
"""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
