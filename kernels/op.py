"""The public op `deltapass::delta_attention`: checks, fake impl, dispatch.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same
kernels under Triton's interpreter when TRITON_INTERPRET=1 was set before
Triton compiled them, and otherwise the exact PyTorch reference in float32.
"""
from __future__ import annotations

import math

import torch

from .launch import LaunchConfig
from .reference import reference_delta_attention
from .rule import DeltaPlan, check_rule_args

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise ValueError naming the argument and value when the inputs cannot be attended."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if q.dtype == torch.float32 and q.device.type == "cuda":
        # The GPU tiles are sized and checked for 16-bit inputs only.
        raise ValueError(f"q.dtype torch.float32 is supported on CPU only; on {q.device} use float16 or bfloat16")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    batch, q_heads, n, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in batch or head_dim")
    if k.shape[2] < 1:
        raise ValueError(f"key length must be >= 1, got {k.shape[2]}")
    if k.shape[1] < 1 or q_heads % k.shape[1] != 0:
        raise ValueError(f"query heads must be a multiple of key/value heads, got Hq={q_heads}, Hkv={k.shape[1]}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got head_dim={head_dim}")
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got N={n}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got scale={scale!r}")


def _interpreting() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .triton_delta import _sparse_rows_kernel

    return isinstance(_sparse_rows_kernel, InterpretedFunction)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, gamma: int,
             correction: str, scale: float | None, launch: LaunchConfig) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.shape[2] != k.shape[2]:
        # Not self-attention prefill: exactly what the replaced SDPA call computed.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=True)
    plan = DeltaPlan(q.shape[2], sink, window, gamma, correction)
    if q.device.type == "cpu" and not _interpreting():
        return reference_delta_attention(q.float(), k.float(), v.float(), sink=sink, window=window,
                                         gamma=gamma, correction=correction, scale=scale).to(q.dtype)
    from .triton_delta import launch_delta_attention

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    return launch_delta_attention(q, k, v, out, plan, scale, launch.resolved(q.shape[-1], q.device))


@torch.library.custom_op("deltapass::delta_attention", mutates_args=())
def _delta_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                        gamma: int, correction: str, scale: float | None, launch: list[int]) -> torch.Tensor:
    return _forward(q, k, v, sink, window, gamma, correction, scale, LaunchConfig(*launch))


@_delta_attention_op.register_fake
def _(q, k, v, sink, window, gamma, correction, scale, launch):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                    gamma: int, correction: str = "delta", scale: float | None = None,
                    **launch: int) -> torch.Tensor:
    """Causal Δ attention for prefill.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] with Hq % Hkv == 0 -> [B, Hq, N, D], q's dtype.
    When k's length differs from q's (not a self-attention prefill) the result is exactly
    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).
    sink, window: the sparse part (attention sinks + sliding window, token exact).
    gamma: every gamma-th row below s_p is exact; correction: "delta", "recompute" or "none".
    launch: block_m, block_n, num_warps, num_stages and their dense_* twins (see LaunchConfig).
    """
    check_inputs(q, k, v, scale)
    check_rule_args(sink, window, gamma, correction)
    config = LaunchConfig.from_kwargs(launch)
    fields = list(config.to_dict().values())
    return _delta_attention_op(q, k, v, sink, window, gamma, correction,
                               None if scale is None else float(scale), fields)
