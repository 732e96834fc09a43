"""The public op `deltapass::delta_attention`: checks, fake impl, dispatch.

Dispatch: CUDA tensors run the Hopper kernels on sm_90 where they fit and the Triton kernels
elsewhere (dispatch.py); CPU tensors run the Triton kernels under Triton's interpreter when
TRITON_INTERPRET=1 was set before Triton compiled them, and otherwise the exact PyTorch
reference in float32.
"""
from __future__ import annotations

import math

import torch

from .launch import LaunchConfig, launch_schema
from .limits import check_delta_call, length_reason
from .reference import reference_delta_attention
from .rule import DeltaPlan


def _interpreting() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_delta import _sparse_rows_kernel

    return isinstance(_sparse_rows_kernel, InterpretedFunction)


def bottom_right_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  scale: float | None) -> torch.Tensor:
    """Exact causal attention with query i at key position N_k - N_q + i (decode, chunked prefill), GQA.

    SDPA's is_causal aligns the other way (query i sees keys <= i), which is wrong for these shapes.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    reason = length_reason(n_q, n_k)
    if reason:
        raise ValueError(reason)
    if q.device.type == "cuda":
        # Flash attention's own lower-right causal variant: no N_q x N_k mask in memory.
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(n_q, n_k)
    else:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=True)


def output_like(q: torch.Tensor) -> torch.Tensor:
    """An empty output for queries q, in the one layout every attention op of the package returns (its fake
    impl says the same): q's strides when q is dense with a unit-stride head dim, else q's dimension order
    made dense, else contiguous. The transposed [B, N, H, D] views a compiled model passes give an output
    in [B, N, H, D] order, which the model's transpose back and reshape to [B, N, H * D] read without a copy."""
    out = torch.empty_like(q)
    return out if out.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)


def in_output_layout(result: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`result` (q's shape) in output_like(q)'s layout: itself when it already is, else a copy."""
    out = output_like(q)
    return result if result.stride() == out.stride() else out.copy_(result)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, gamma: int,
             correction: str, scale: float | None, launch: LaunchConfig) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.shape[2] != k.shape[2]:
        # Not a whole-sequence prefill: exact, with the queries at the end of the keys.
        return in_output_layout(bottom_right_causal_attention(q, k, v, scale), q)
    plan = DeltaPlan(q.shape[2], sink, window, gamma, correction)
    if q.device.type == "cpu" and not _interpreting():
        if launch.hopper == 1:   # the kernels do not run here; dispatch.py says why (hopper=1 requires them)
            from .dispatch import hopper_reason

            raise ValueError(f"launch parameter hopper=1, but {hopper_reason(q, k, v, launch)}")
        rule_out = reference_delta_attention(q.float(), k.float(), v.float(), sink=sink, window=window, gamma=gamma,
                                             correction=correction, scale=scale)
        return in_output_layout(rule_out.to(q.dtype), q)
    from .dispatch import launch_delta

    out = output_like(q)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return launch_delta(q, k, v, out, plan, scale, launch)


# The launch parameters cross the schema as keyword-only ints named after LaunchConfig's fields.
DELTA_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, int sink, int window, int gamma, str correction, "
                          f"float? scale, {launch_schema()}) -> Tensor")


@torch.library.custom_op("deltapass::delta_attention", mutates_args=(), schema=DELTA_ATTENTION_SCHEMA)
def _delta_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                        gamma: int, correction: str, scale: float | None, **launch: int) -> torch.Tensor:
    # Launch parameters left at their schema default arrive absent: LaunchConfig's defaults are the same 0.
    config = check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch)
    return _forward(q, k, v, sink, window, gamma, correction, scale, config)


@_delta_attention_op.register_fake
def _(q, k, v, sink, window, gamma, correction, scale, **launch):
    check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch)   # a bad call fails at trace time
    return output_like(q)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                    gamma: int, correction: str = "delta", scale: float | None = None,
                    **launch: int) -> torch.Tensor:
    """Causal Δ attention for prefill.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] with Hq % Hkv == 0 -> [B, Hq, N, D], q's dtype, laid out as
    output_like(q) (q's strides for the transposed [B, N, H, D] views a model passes).
    When k is longer than q (decode, chunked prefill: N_q < N_k) the result is exact causal attention
    with query i at key position N_k - N_q + i (bottom-right, unlike SDPA's is_causal, which aligns
    top-left); N_q > N_k is a ValueError.
    sink, window: the sparse part (attention sinks + sliding window, token exact).
    gamma: every gamma-th row below s_p is exact; correction: one of CORRECTIONS (see rule.py):
    "delta", "recompute", "tail" or "none".
    launch: block_m, block_n, num_warps, num_stages, their dense_* twins and kv_tma (see LaunchConfig).

    Non-finite inputs follow the rule: under "delta" a NaN or Inf in q at a sample row (0, gamma, ...)
    reaches that row's delta, which every row of its gamma block adds, so the whole block of output
    rows that take that delta becomes non-finite, not just the one row.
    """
    config = check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch)
    return _delta_attention_op(q, k, v, sink, window, gamma, correction,
                               None if scale is None else float(scale), **config.to_dict())
