"""Δ attention over packed prompts of different lengths: the op `deltapass::delta_attention_varlen`.

Serving engines pack a batch's prompts into one tensor with cumulative sequence offsets, as
flash_attn_varlen_func takes them: q [total_q, Hq, D], k/v [total_k, Hkv, D]; sequence i's queries are
q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] and its keys k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]. Each sequence
gets exactly what delta_attention returns for it alone: its queries bottom-right in its keys, of a prompt
of prompt_lengths[i] tokens (None: its key count).

The kernels run once per sequence (`_by_sequence`), on [1, H, N, D] views of the packed tensors, writing
into the packed output: no copy in or out, but one launch pair per sequence and one host read of the
offsets per call. (One launch over all sequences needs a sequence id per work item in the kernels.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .launch import LaunchConfig, launch_schema
from .limits import check_call_arguments, cu_seqlens_reason, packed_reason, prompt_length_reason, unsupported_reason
from .op import _forward, output_like


def _sequence(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of packed x [total, H, D] as one sequence [1, H, hi - lo, D] (a view)."""
    return x[lo:hi].transpose(0, 1).unsqueeze(0)


def sequence_bounds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor,
                    prompt_lengths: Sequence[int | None] | None) -> list[tuple[int, int, int, int, int]]:
    """(q_lo, q_hi, k_lo, k_hi, prompt_length) of each packed sequence; ValueError naming the argument and
    value that cannot be (see limits.py)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    reason = packed_reason(q.shape, k.shape, v.shape)
    devices = {t.device for t in (q, k, v, cu_seqlens_q, cu_seqlens_k)}
    if not reason and len(devices) > 1:
        reason = (f"q, k, v, cu_seqlens_q, cu_seqlens_k must be on one device, got q={q.device}, "
                  f"cu_seqlens_q={cu_seqlens_q.device}, cu_seqlens_k={cu_seqlens_k.device}")
    cu_q = cu_seqlens_q.tolist() if cu_seqlens_q.dim() == 1 else []
    cu_k = cu_seqlens_k.tolist() if cu_seqlens_k.dim() == 1 else []
    reason = (reason or cu_seqlens_reason("cu_seqlens_q", cu_seqlens_q.dtype, cu_seqlens_q.shape, cu_q, q.shape[0])
              or cu_seqlens_reason("cu_seqlens_k", cu_seqlens_k.dtype, cu_seqlens_k.shape, cu_k, k.shape[0]))
    if not reason and len(cu_q) != len(cu_k):
        reason = (f"cu_seqlens_q and cu_seqlens_k must count the same sequences, got {len(cu_q) - 1} and "
                  f"{len(cu_k) - 1}")
    n_seq = len(cu_q) - 1
    if not reason and prompt_lengths is not None and len(prompt_lengths) != n_seq:
        reason = f"prompt_lengths must have one entry per sequence ({n_seq}), got {len(prompt_lengths)}"
    if reason:
        raise ValueError(reason)
    bounds = []
    for i in range(n_seq):
        n_q, n_k = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        shapes = [(1, t.shape[1], n, t.shape[2]) for t, n in ((q, n_q), (k, n_k), (v, n_k))]
        length = n_k if prompt_lengths is None or prompt_lengths[i] is None else prompt_lengths[i]
        reason = (unsupported_reason(*shapes, q.dtype, k.dtype, v.dtype, q.device.type)
                  or prompt_length_reason(length, n_k).replace("prompt_length", f"prompt_lengths[{i}]"))
        if reason:
            raise ValueError(f"sequence {i} (cu_seqlens_q[{i}:{i + 2}]={cu_q[i:i + 2]}, "
                             f"cu_seqlens_k[{i}:{i + 2}]={cu_k[i:i + 2]}): {reason}")
        bounds.append((cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1], length))
    return bounds


def _by_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, sink: int, window: int, gamma: int, correction: str,
                 scale: float | None, prompt_lengths: Sequence[int | None] | None,
                 launch: LaunchConfig) -> torch.Tensor:
    """Each sequence through the op's own path (op._forward), into its rows of the packed `out`."""
    for q_lo, q_hi, k_lo, k_hi, length in sequence_bounds(q, k, v, cu_seqlens_q, cu_seqlens_k, prompt_lengths):
        _forward(_sequence(q, q_lo, q_hi), _sequence(k, k_lo, k_hi), _sequence(v, k_lo, k_hi), sink, window, gamma,
                 correction, scale, launch, length, out=_sequence(out, q_lo, q_hi))
    return out


DELTA_ATTENTION_VARLEN_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int sink, int window, int gamma, "
    f"str correction, float? scale, int[]? prompt_lengths=None, {launch_schema()}) -> Tensor")


@torch.library.custom_op("deltapass::delta_attention_varlen", mutates_args=(), schema=DELTA_ATTENTION_VARLEN_SCHEMA)
def _delta_attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, sink: int, window: int, gamma: int, correction: str,
                               scale: float | None, prompt_lengths: list[int] | None = None,
                               **launch: int) -> torch.Tensor:
    config = check_call_arguments(sink, window, gamma, correction, scale, launch)   # the offsets: sequence_bounds
    return _by_sequence(q, k, v, output_like(q), cu_seqlens_q, cu_seqlens_k, sink, window, gamma, correction, scale,
                        prompt_lengths, config)


@_delta_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, sink, window, gamma, correction, scale, prompt_lengths=None, **launch):
    # What a trace can check without the offsets' values (the real op checks those per call).
    check_call_arguments(sink, window, gamma, correction, scale, launch)
    reason = packed_reason(q.shape, k.shape, v.shape)
    if reason:
        raise ValueError(reason)
    return output_like(q)


def delta_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, *, sink: int, window: int, gamma: int,
                           correction: str = "delta", scale: float | None = None,
                           prompt_lengths: Sequence[int | None] | None = None, **launch: int) -> torch.Tensor:
    """Δ attention over packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D] -> [total_q, Hq, D].

    cu_seqlens_q, cu_seqlens_k: int32 [S + 1] cumulative offsets of the S sequences' queries and keys (as
    flash_attn_varlen_func); sequence i has N_q <= N_k, its queries the last N_q of its N_k positions.
    prompt_lengths: per sequence, the length of the prompt it is a chunk of (None, or a None entry: N_k).
    sink, window, gamma, correction, scale and the launch parameters as in delta_attention, which each
    sequence's rows equal.
    """
    config = check_call_arguments(sink, window, gamma, correction, scale, launch)
    if prompt_lengths is not None:
        if isinstance(prompt_lengths, (str, bytes)) or not isinstance(prompt_lengths, Sequence):
            raise TypeError(f"prompt_lengths must be a sequence of ints (or None), got {prompt_lengths!r}")
        cu_k = cu_seqlens_k.tolist() if isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_k.dim() == 1 else []
        # A None entry is its sequence's key count, which the schema's int[] carries as itself.
        prompt_lengths = [cu_k[i + 1] - cu_k[i] if length is None and i + 1 < len(cu_k) else length
                          for i, length in enumerate(prompt_lengths)]
    return _delta_attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, sink, window, gamma, correction,
                                      None if scale is None else float(scale), prompt_lengths, **config.to_dict())
