"""The masked Δ op: a run-time check of an input mask, Δ when it is exactly causal, exact attention otherwise."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deltapass.kernels import (LaunchConfig, delta_attention, delta_attention_masked, exact_attention_masked,
                               keeps_exactly_causal, mask_is_causal, reference_delta_attention)
from deltapass.kernels import masked as masked_module

from helpers import max_abs_err, random_qkv

RULE = dict(sink=4, window=24, gamma=16)


def causal_keep(n: int, batch: int = 1) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril().expand(batch, 1, n, n)


def encode(keep: torch.Tensor, kind: str, dtype=torch.float32) -> torch.Tensor:
    if kind == "keep":
        return keep
    if kind == "blocked":
        return ~keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("kind", ["keep", "blocked", "additive"])
def test_check_accepts_exactly_causal_and_nothing_else(kind):
    n = 37
    assert bool(mask_is_causal(encode(causal_keep(n, 3), kind), kind))
    padded = causal_keep(n, 2).clone()
    padded[1, :, :, :5] = False                                     # left padding in the second sequence
    window = causal_keep(n).clone() & torch.ones(n, n, dtype=torch.bool).triu(-8)
    one_cell = causal_keep(n).clone()
    one_cell[0, 0, n - 1, n - 1] = False                            # the last row's diagonal
    upper = causal_keep(n).clone()
    upper[0, 0, 3, 4] = True
    for bad in (padded, window, one_cell, upper):
        assert not bool(mask_is_causal(encode(bad, kind), kind))
    assert not bool(keeps_exactly_causal(encode(causal_keep(n)[..., :-1], kind), kind))   # not square


def test_additive_bias_is_not_a_mask_and_chunks_cover_every_row(monkeypatch):
    n = 50
    mask = encode(causal_keep(n), "additive")
    biased = mask.clone()
    biased[0, 0, 10, 20] = -100.0                                   # masked out only softly: a bias
    assert not bool(mask_is_causal(biased, "additive"))
    monkeypatch.setattr(masked_module, "_CHECK_ELEMENTS", 3 * n)     # 3 rows per chunk, 17 chunks
    assert bool(keeps_exactly_causal(mask, "additive"))
    late = mask.clone()
    late[0, 0, n - 1, 0] = -1e9                                     # a wrong cell in the last chunk
    assert not bool(keeps_exactly_causal(late, "additive"))


@pytest.mark.parametrize("kind", ["keep", "blocked", "additive"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_causal_mask_runs_delta_and_other_masks_run_exact(kind, hq, hkv):
    n, d = 203, 64
    q, k, v = random_qkv(2, hq, hkv, n, d, torch.float32, seed=hq * 7 + len(kind))
    out = delta_attention_masked(q, k, v, encode(causal_keep(n, 2), kind), mask_kind=kind, **RULE)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **RULE)
    assert max_abs_err(out, truth) < 2e-5
    assert max_abs_err(out, delta_attention(q, k, v, **RULE)) < 1e-6

    padded = causal_keep(n, 2).clone()
    padded[0, :, :, :7] = False
    padded[0, :, torch.arange(7), torch.arange(7)] = True           # padded rows see themselves: no empty row
    out = delta_attention_masked(q, k, v, encode(padded, kind), mask_kind=kind, **RULE)
    groups = hq // hkv
    kx, vx = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ kx.transpose(-2, -1)) / d ** 0.5
    exact = torch.softmax(scores.masked_fill(~padded, float("-inf")), dim=-1) @ vx
    assert max_abs_err(out, exact) < 2e-5


def test_a_precomputed_flag_is_used_and_decode_shapes_stay_exact():
    n, d = 150, 64
    q, k, v = random_qkv(1, 2, 1, n, d, torch.float32, seed=5)
    mask = causal_keep(n)
    forced_exact = delta_attention_masked(q, k, v, mask, mask_kind="keep", mask_causal=torch.tensor(False), **RULE)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_abs_err(forced_exact, exact) < 1e-5
    # A decode step: one query row against the whole cache, mask [1, 1, 1, n].
    step = delta_attention_masked(q[:, :, -1:], k, v, mask[..., -1:, :], mask_kind="keep", **RULE)
    assert max_abs_err(step, exact[:, :, -1:]) < 1e-5


def test_bad_masks_name_the_argument():
    q, k, v = random_qkv(1, 2, 2, 64, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="mask_kind"):
        delta_attention_masked(q, k, v, causal_keep(64), mask_kind="causal", **RULE)
    with pytest.raises(ValueError, match="mask.dtype"):
        delta_attention_masked(q, k, v, causal_keep(64).float(), mask_kind="keep", **RULE)
    with pytest.raises(ValueError, match="mask.dtype"):
        mask_is_causal(causal_keep(64), "additive")
    with pytest.raises(ValueError, match="mask must be a tensor"):
        mask_is_causal(torch.ones(64, dtype=torch.bool), "keep")


def masked_truth(q, k, v, keep):
    """Float64, whole matrix, K/V expanded per query head: softmax over the keys `keep` allows."""
    group = q.shape[1] // k.shape[1]
    kx, vx = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ kx.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ vx


def bottom_right_keep(n_q: int, n_k: int) -> torch.Tensor:
    """Query i of a chunk at the last n_q of n_k positions keeps the keys j <= n_k - n_q + i."""
    return (torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q).expand(1, 1, n_q, n_k)


@pytest.mark.parametrize("kind", ["keep", "blocked", "additive"])
def test_check_accepts_a_chunks_bottom_right_mask_and_nothing_else(kind, monkeypatch):
    n_q, n_k = 37, 300
    chunk = bottom_right_keep(n_q, n_k)
    assert bool(mask_is_causal(encode(chunk, kind), kind))
    assert bool(mask_is_causal(encode(bottom_right_keep(1, n_k), kind), kind))          # decode
    top_left = torch.ones(n_q, n_k, dtype=torch.bool).tril()                            # SDPA's is_causal
    off_by_one = chunk.clone()
    off_by_one[0, 0, n_q - 1, n_k - 1] = False
    padded = chunk.clone()
    padded[..., 3] = False
    window = chunk & torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q - 40)
    for bad in (top_left, off_by_one, padded, window):
        assert not bool(mask_is_causal(encode(bad, kind), kind))
    more_queries = torch.ones(n_k, n_q, dtype=torch.bool).tril()
    assert not bool(keeps_exactly_causal(encode(more_queries, kind), kind))
    monkeypatch.setattr(masked_module, "_CHECK_ELEMENTS", 5 * n_k)                     # 5 rows per check chunk
    assert bool(keeps_exactly_causal(encode(chunk, kind), kind))
    assert not bool(keeps_exactly_causal(encode(off_by_one, kind), kind))


@pytest.mark.parametrize("n_q", [1, 37])
def test_masked_op_takes_a_non_causal_non_square_mask_as_given(n_q):
    """Decode and chunked prefill against a 300-key cache with one padded key: the mask is the truth."""
    n_k = 300
    q, _, _ = random_qkv(1, 6, 2, n_q, 64, torch.float32, seed=40 + n_q)
    _, k, v = random_qkv(1, 6, 2, n_k, 64, torch.float32, seed=41)
    keep = bottom_right_keep(n_q, n_k).clone()
    keep[..., 3] = False
    out = delta_attention_masked(q, k, v, keep, mask_kind="keep", **RULE)
    assert max_abs_err(out, masked_truth(q, k, v, keep)) < 2e-5
    for flag in (None, torch.tensor(True)):     # the exact op aligns is_causal top-left: a chunk's mask is read
        out = exact_attention_masked(q, k, v, keep, mask_kind="keep", mask_causal=flag)
        assert max_abs_err(out, masked_truth(q, k, v, keep)) < 2e-5


@pytest.mark.parametrize("kind", ["keep", "additive"])
@pytest.mark.parametrize("prompt_length", [None, 700])
def test_masked_op_runs_delta_on_a_chunk_with_a_bottom_right_mask(kind, prompt_length):
    """A chunk of 203 queries over 480 keys whose mask is bottom-right causal: the Δ op's rows for that chunk
    of a prompt_length-token prompt (float64 truth), which differ from exact attention."""
    n_q, n_k = 203, 480
    q, _, _ = random_qkv(2, 6, 2, n_q, 64, torch.float32, seed=50)
    _, k, v = random_qkv(2, 6, 2, n_k, 64, torch.float32, seed=51)
    mask = encode(bottom_right_keep(n_q, n_k).expand(2, 1, n_q, n_k), kind)
    out = delta_attention_masked(q, k, v, mask, mask_kind=kind, prompt_length=prompt_length, **RULE)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), prompt_length=prompt_length, **RULE)
    assert max_abs_err(out, truth) < 2e-5
    assert max_abs_err(out, masked_truth(q, k, v, bottom_right_keep(n_q, n_k))) > 1e-2


@pytest.mark.parametrize("kind", ["keep", "additive"])
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2)])
def test_exact_masked_op_causal_and_padded(kind, hq, hkv):
    """Exactly causal masks take SDPA is_causal (the mask is not read); any other mask is used as given."""
    n, d = 77, 64
    q, k, v = random_qkv(2, hq, hkv, n, d, torch.float32, seed=hq * 5 + hkv)
    causal = causal_keep(n, 2)
    out = exact_attention_masked(q, k, v, encode(causal, kind), mask_kind=kind)
    assert max_abs_err(out, masked_truth(q, k, v, causal)) < 2e-5
    padded = causal.clone()
    padded[1, :, :, :6] = False                                     # left padding in the second sequence
    padded[1, :, torch.arange(6), torch.arange(6)] = True
    out = exact_attention_masked(q, k, v, encode(padded, kind), mask_kind=kind, scale=0.2)
    truth = masked_truth(q * (0.2 * math.sqrt(d)), k, v, padded)
    assert max_abs_err(out, truth) < 2e-5
    # A true flag means "plain causal": the padded mask is then not read at all.
    forced = exact_attention_masked(q, k, v, encode(padded, kind), mask_kind=kind, mask_causal=torch.tensor(True))
    assert max_abs_err(forced, masked_truth(q, k, v, causal)) < 2e-5


def test_ops_pass_opcheck():
    q, k, v = random_qkv(1, 2, 1, 96, 64, torch.float32, seed=2)
    mask = causal_keep(96)
    padded = mask.clone()
    padded[..., :4] = True
    torch.library.opcheck(torch.ops.deltapass.mask_is_causal.default, (mask, "keep"))
    torch.library.opcheck(torch.ops.deltapass.delta_attention_masked.default,
                          (q, k, v, mask, "keep", torch.tensor(True), 4, 24, 16, "delta", None),
                          LaunchConfig(block_m=32, block_n=16, dense_block_m=32, dense_block_n=16).to_dict())
    for m, flag in ((mask, True), (padded, False)):
        torch.library.opcheck(torch.ops.deltapass.exact_attention_masked.default,
                              (q, k, v, m, "keep", torch.tensor(flag), None))
    q_short = q[:, :, -5:]
    torch.library.opcheck(torch.ops.deltapass.exact_attention_masked.default,
                          (q_short, k, v, mask[..., -5:, :], "keep", torch.tensor(False), 0.3))


def test_masked_op_takes_launch_parameters_by_name():
    schema = torch.ops.deltapass.delta_attention_masked.default._schema
    keyword = [a.name for a in schema.arguments if a.kwarg_only]
    assert keyword == [f.name for f in dataclasses.fields(LaunchConfig)]
    q, k, v = random_qkv(1, 2, 1, 40, 64, torch.float32, seed=3)
    with pytest.raises(ValueError, match=r"launch parameter dense_num_warps must be 1, 2, 4, 8 or 16, got 3"):
        torch.ops.deltapass.delta_attention_masked.default(q, k, v, causal_keep(40), "keep", torch.tensor(True),
                                                           4, 24, 16, "delta", None, dense_num_warps=3)


def test_only_the_ops_that_read_the_mask_flag_on_the_host_are_cudagraph_unsafe():
    # Inductor's mode="reduce-overhead" must run the masked ops outside CUDA graphs (they sync on the
    # mask check) and may capture the plain Δ op and the device-side mask check.
    unsafe = torch.Tag.cudagraph_unsafe
    assert unsafe in torch.ops.deltapass.delta_attention_masked.default.tags
    assert unsafe in torch.ops.deltapass.exact_attention_masked.default.tags
    assert unsafe not in torch.ops.deltapass.delta_attention.default.tags
    assert unsafe not in torch.ops.deltapass.mask_is_causal.default.tags
