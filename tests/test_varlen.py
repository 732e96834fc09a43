"""The packed variable-length op: each sequence's rows are the op's rows for that sequence alone."""
from __future__ import annotations

import pytest
import torch

from deltapass.kernels import LaunchConfig, delta_attention, delta_attention_varlen, reference_delta_attention
from deltapass.kernels.varlen import _by_sequence

from helpers import max_abs_err

RULE = dict(sink=4, window=24, gamma=16)
TILES = dict(block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
# (N_q, N_k, prompt_length): odd lengths; shorter than sink + window (dense), longer (Δ with a tail); a
# decode step; a last chunk; an earlier chunk of a longer prompt; one at a misaligned start.
SEQUENCES = [(37, 37, None), (211, 211, None), (1, 150, None), (96, 257, None), (64, 160, 400), (19, 27, None),
             (53, 181, 300)]


def packed(sequences, hq, hkv, dtype, seed):
    """Fresh packed q, k, v and int32 offsets for sequences of (N_q, N_k)."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(s[0] for s in sequences), sum(s[1] for s in sequences)
    q = torch.randn(total_q, hq, 64, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(total_k, hkv, 64, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + [sum(s[0] for s in sequences[:i + 1]) for i in range(len(sequences))],
                        dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s[1] for s in sequences[:i + 1]) for i in range(len(sequences))],
                        dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def one(x, lo, hi):
    return x[lo:hi].transpose(0, 1).unsqueeze(0)


# (interpreted kernels or the CPU's exact path, correction, Hq, Hkv): every correction and GQA 3:1, 1:1, 8:1 on
# each path (the interpreter is slow: one ratio per correction there).
PATHS = ([(True, c, hq, hkv) for c, (hq, hkv) in zip(("delta", "recompute", "tail", "none"),
                                                     ((6, 2), (8, 1), (4, 4), (6, 2)))]
         + [(False, c, 6, 2) for c in ("delta", "recompute", "tail", "none")] + [(False, "delta", 8, 1),
                                                                                  (False, "delta", 4, 4)])


@pytest.mark.parametrize("kernels, correction, hq, hkv", PATHS)
def test_each_sequence_gets_what_the_op_gives_it_alone(hq, hkv, kernels, correction, monkeypatch):
    """Mixed lengths and GQA, on the interpreted kernels and on the CPU's exact path: bitwise the per-sequence op,
    and within float32 rounding of the float64 reference."""
    from deltapass.kernels import op

    if not kernels:
        monkeypatch.setattr(op, "_interpreting", lambda: False)
    q, k, v, cu_q, cu_k = packed(SEQUENCES, hq, hkv, torch.float32, seed=hq * 10 + hkv)
    lengths = [s[2] for s in SEQUENCES]
    kw = dict(**RULE, correction=correction)
    out = delta_attention_varlen(q, k, v, cu_q, cu_k, prompt_lengths=lengths, **kw, **TILES)
    assert out.shape == q.shape and out.dtype == q.dtype
    for i, length in enumerate(lengths):
        (q0, q1), (k0, k1) = cu_q[i:i + 2].tolist(), cu_k[i:i + 2].tolist()
        alone = delta_attention(one(q, q0, q1), one(k, k0, k1), one(v, k0, k1), prompt_length=length, **kw, **TILES)
        assert torch.equal(one(out, q0, q1), alone), f"sequence {i}"
        truth = reference_delta_attention(*(one(t, *b).double() for t, b in ((q, (q0, q1)), (k, (k0, k1)),
                                                                             (v, (k0, k1)))),
                                          prompt_length=length, **kw)
        assert max_abs_err(one(out, q0, q1), truth) < 2e-5, f"sequence {i}"


def test_every_row_of_a_poisoned_packed_output_is_written():
    q, k, v, cu_q, cu_k = packed(SEQUENCES, 6, 2, torch.float32, seed=5)
    out = torch.full_like(q, float("nan"))
    _by_sequence(q, k, v, out, cu_q, cu_k, **RULE, correction="delta", scale=None,
                 prompt_lengths=[s[2] for s in SEQUENCES], launch=LaunchConfig(**TILES))
    assert not out.isnan().any()


def test_none_prompt_lengths_mean_each_sequence_ends_its_prompt():
    q, k, v, cu_q, cu_k = packed(SEQUENCES[:4], 4, 2, torch.float32, seed=6)
    plain = delta_attention_varlen(q, k, v, cu_q, cu_k, **RULE, **TILES)
    assert torch.equal(plain, delta_attention_varlen(q, k, v, cu_q, cu_k, prompt_lengths=[None, 211, None, 257],
                                                     **RULE, **TILES))


def test_the_op_is_registered_with_a_fake_impl():
    q, k, v, cu_q, cu_k = packed(SEQUENCES[:3], 4, 2, torch.float32, seed=7)
    args = (q, k, v, cu_q, cu_k, 4, 24, 16, "delta", None, [37, 300, 150])
    torch.library.opcheck(torch.ops.deltapass.delta_attention_varlen.default, args, TILES)


@pytest.mark.parametrize("change, match", [
    (dict(cu_q=[0, 37, 30, 40]), r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\]=37 > cu_seqlens_q\[2\]=30"),
    (dict(cu_q=[0, 37, 248, 248]), r"cu_seqlens_q\[-1\] must be the packed length 249, got cu_seqlens_q\[-1\]=248"),
    (dict(cu_k=[1, 37, 248, 398]), r"cu_seqlens_k must start at 0, got cu_seqlens_k\[0\]=1"),
    (dict(dtype=torch.int64), r"cu_seqlens_q must be torch.int32 .* got cu_seqlens_q.dtype=torch.int64"),
    (dict(cu_k=[0, 398]), r"cu_seqlens_q and cu_seqlens_k must count the same sequences, got 3 and 1"),
    (dict(lengths=[None, 100, None]), r"sequence 1 .*prompt_lengths\[1\] must be >= the key length N_k=211"),
    (dict(lengths=[None, None]), r"prompt_lengths must have one entry per sequence \(3\), got 2"),
    (dict(cu_k=[0, 30, 241, 398]), r"sequence 0 .*query length N_q=37 must be <= key length N_k=30"),
])
def test_bad_offsets_are_refused_by_name(change, match):
    q, k, v, cu_q, cu_k = packed(SEQUENCES[:3], 4, 2, torch.float32, seed=8)
    dtype = change.get("dtype", torch.int32)
    cu_q = torch.tensor(change.get("cu_q", cu_q.tolist()), dtype=dtype)
    cu_k = torch.tensor(change.get("cu_k", cu_k.tolist()), dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        delta_attention_varlen(q, k, v, cu_q, cu_k, prompt_lengths=change.get("lengths"), **RULE)


def test_unpacked_inputs_are_refused_by_name():
    q, k, v, cu_q, cu_k = packed(SEQUENCES[:2], 4, 2, torch.float32, seed=9)
    with pytest.raises(ValueError, match=r"q must be 3-D \[total_tokens, heads, head_dim\]"):
        delta_attention_varlen(q[None], k, v, cu_q, cu_k, **RULE)
