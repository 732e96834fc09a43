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
from .prompt import prompt_length_for_call
from .reference import reference_delta_attention
from .rule import DeltaPlan


def _interpreting() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_delta import _sparse_rows_kernel

    return isinstance(_sparse_rows_kernel, InterpretedFunction)


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
             correction: str, scale: float | None, launch: LaunchConfig,
             prompt_length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The op's rows into `out` (q's shape and dtype, a unit-stride head dim; varlen.py passes slices of its
    packed output), or into a new output_like(q)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # The queries are the last N_q of the N_k keys' positions (bottom-right) in a prompt of prompt_length tokens.
    n_q, n_k = q.shape[2], k.shape[2]
    reason = length_reason(n_q, n_k)      # the op called through torch.ops skips delta_attention's checks
    if reason:
        raise ValueError(reason)
    plan = DeltaPlan(n_k, sink, window, gamma, correction, start=n_k - n_q, prompt_length=prompt_length)
    if q.device.type == "cpu" and not _interpreting():
        if launch.hopper == 1:   # the kernels do not run here; dispatch.py says why (hopper=1 requires them)
            from .dispatch import hopper_reason

            raise ValueError(f"launch parameter hopper=1, but {hopper_reason(q, k, v, launch, plan)}")
        rule_out = reference_delta_attention(q.float(), k.float(), v.float(), sink=sink, window=window, gamma=gamma,
                                             correction=correction, scale=scale, prompt_length=prompt_length)
        return in_output_layout(rule_out.to(q.dtype), q) if out is None else out.copy_(rule_out)
    from .dispatch import launch_delta

    out = output_like(q) if out is None else out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return launch_delta(q, k, v, out, plan, scale, launch)


# The launch parameters cross the schema as keyword-only ints named after LaunchConfig's fields.
DELTA_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, int sink, int window, int gamma, str correction, "
                          f"float? scale, int? prompt_length=None, {launch_schema()}) -> Tensor")


@torch.library.custom_op("deltapass::delta_attention", mutates_args=(), schema=DELTA_ATTENTION_SCHEMA)
def _delta_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                        gamma: int, correction: str, scale: float | None, prompt_length: int | None = None,
                        **launch: int) -> torch.Tensor:
    # Launch parameters left at their schema default arrive absent: LaunchConfig's defaults are the same 0.
    # The prompt's length, when not given, is read per call (kernels/prompt.py): a compiled graph runs every chunk.
    prompt_length = prompt_length_for_call(prompt_length)
    config = check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch, prompt_length)
    return _forward(q, k, v, sink, window, gamma, correction, scale, config, prompt_length)


@_delta_attention_op.register_fake
def _(q, k, v, sink, window, gamma, correction, scale, prompt_length=None, **launch):
    # a bad call fails at trace time
    check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch, prompt_length)
    return output_like(q)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                    gamma: int, correction: str = "delta", scale: float | None = None,
                    prompt_length: int | None = None, **launch: int) -> torch.Tensor:
    """Causal Δ attention for prefill, of a whole prompt or of one chunk of it over a KV cache.

    q: [B, Hq, N_q, D]; k, v: [B, Hkv, N_k, D] with Hq % Hkv == 0 and N_q <= N_k -> [B, Hq, N_q, D], q's
    dtype, laid out as output_like(q) (q's strides for the transposed [B, N, H, D] views a model passes).
    Query i sits at position p + i, p = N_k - N_q (bottom-right, unlike SDPA's is_causal, which aligns
    top-left), and gets its row of the rule over a prompt of prompt_length tokens (rule.py): None means
    the length set by a deltapass.kernels.prompt_length() block around the call (kernels/prompt.py), else
    N_k, the chunk ends the prompt (a whole prompt, the last chunk, decode: N_q = 1 is a tail row, so
    exact). An earlier chunk passes the prompt's full length, so that its last rows are not taken for
    the prompt's dense tail. Chunks whose first positions are multiples of gamma give exactly the rows
    of one call over the whole prompt; a chunk starting elsewhere takes its first gamma block's delta
    from its own first row (rule.py). N_q > N_k and prompt_length < N_k are ValueErrors.
    sink, window: the sparse part (attention sinks + sliding window, token exact).
    gamma: every gamma-th row below s_p is exact; correction: one of CORRECTIONS (see rule.py):
    "delta", "recompute", "tail" or "none".
    launch: block_m, block_n, num_warps, num_stages, their dense_* twins and kv_tma (see LaunchConfig).

    Non-finite inputs follow the rule: under "delta" a NaN or Inf in q at a sample row (0, gamma, ...)
    reaches that row's delta, which every row of its gamma block adds, so the whole block of output
    rows that take that delta becomes non-finite, not just the one row.
    """
    config = check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch, prompt_length)
    return _delta_attention_op(q, k, v, sink, window, gamma, correction,
                               None if scale is None else float(scale), prompt_length, **config.to_dict())
