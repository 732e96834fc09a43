"""What the Δ op accepts: its input limits, stated once for the op's checks and for the compiler pass.

`unsupported_reason` takes plain values (shapes, dtypes, a device type), so the
op calls it with its tensors' metadata and the pass with an FX node's. Shapes
are compared as Python ints: the pass passes the values it knows at compile
time (an int, or a SymInt's hint), the op its tensors' real sizes.

`check_delta_call` is every check of one Δ call. The Python wrapper, the registered
op (which torch.compile graphs and anyone else call directly) and its fake impl (so a
bad call fails at trace time) all run it: one function, the same errors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .launch import LaunchConfig

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_PROMPT_LENGTH = 2**31 - 1     # the kernels take positions as int32


def length_reason(n_q: int, n_k: int) -> str:
    """Why query length n_q cannot attend causally to key length n_k ("" if it can).

    Query i sits at key position n_k - n_q + i (bottom-right causal), so n_q must not exceed n_k.
    """
    if n_q < 1:
        return f"sequence length must be >= 1, got N={n_q}"
    if n_k < 1:
        return f"key length must be >= 1, got {n_k}"
    if n_q > n_k:
        return (f"query length N_q={n_q} must be <= key length N_k={n_k} "
                "(query i sits at key position N_k - N_q + i)")
    return ""


def prompt_length_reason(prompt_length: int, n_k: int) -> str:
    """Why prompt_length cannot be the length of a prompt whose first n_k tokens are the keys ("" if it can).

    A chunk of queries ends at key n_k; the prompt it belongs to goes on to prompt_length >= n_k tokens.
    """
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        return f"prompt_length must be an int or None, got prompt_length={prompt_length!r}"
    if prompt_length < n_k:
        return (f"prompt_length must be >= the key length N_k={n_k} (the chunk's keys are the prompt's first "
                f"N_k tokens), got prompt_length={prompt_length}")
    if prompt_length > MAX_PROMPT_LENGTH:
        return (f"prompt_length must be <= 2**31 - 1 (the kernels take positions as int32), "
                f"got prompt_length={prompt_length}")
    return ""


def unsupported_reason(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                       dtype_q: torch.dtype, dtype_k: torch.dtype, dtype_v: torch.dtype, device_type: str,
                       requires_grad: bool = False) -> str:
    """Why q, k, v of these shapes/dtypes on this device type cannot take the Δ op ("" when they can).

    q: [B, Hq, N_q, D]; k, v: [B, Hkv, N_k, D]. The op itself passes requires_grad=False (it runs
    forward only and leaves autograd to the caller); the pass passes the real flag to keep training
    graphs exact.
    """
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            return f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {shape}"
    for name, dtype in (("q", dtype_q), ("k", dtype_k), ("v", dtype_v)):
        if dtype not in SUPPORTED_DTYPES:
            return f"{name}.dtype must be one of {SUPPORTED_DTYPES}, got {dtype}"
    if not (dtype_q == dtype_k == dtype_v):
        return f"q, k, v must share a dtype, got q={dtype_q}, k={dtype_k}, v={dtype_v}"
    if dtype_q == torch.float32 and device_type not in ("cpu", "meta"):
        # The GPU tiles are sized and checked for 16-bit inputs only ("meta" carries shapes, no numbers).
        return f"q.dtype torch.float32 is supported on CPU only; on {device_type} use float16 or bfloat16"
    if k_shape != v_shape:
        return f"k and v must have the same shape, got k={k_shape}, v={v_shape}"
    batch, q_heads, n_q, head_dim = q_shape
    if k_shape[0] != batch or k_shape[3] != head_dim:
        return f"k/v shape {k_shape} does not match q shape {q_shape} in batch or head_dim"
    if k_shape[1] < 1 or q_heads % k_shape[1] != 0:
        return f"query heads must be a multiple of key/value heads, got Hq={q_heads}, Hkv={k_shape[1]}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got head_dim={head_dim}"
    reason = length_reason(n_q, k_shape[2])
    if reason:
        return reason
    if requires_grad:
        return "inputs require grad (the Δ op runs forward only)"
    return ""


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise ValueError naming the argument and value when the inputs cannot be attended (see unsupported_reason)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    reason = unsupported_reason(q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device.type)
    if reason:
        raise ValueError(reason)
    check_scale(scale)


def check_scale(scale: float | None) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got scale={scale!r}")


def check_delta_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, gamma: int,
                     correction: str, scale: float | None, launch: Mapping[str, int],
                     prompt_length: int | None = None) -> LaunchConfig:
    """Raise (ValueError, or TypeError for a wrong type) unless the Δ op can take these arguments; return the
    launch parameters as a LaunchConfig."""
    check_inputs(q, k, v, scale)
    if prompt_length is not None:
        reason = prompt_length_reason(prompt_length, k.shape[2])
        if reason:
            raise ValueError(reason)
    return check_call_arguments(sink, window, gamma, correction, scale, launch)


def check_call_arguments(sink: int, window: int, gamma: int, correction: str, scale: float | None,
                         launch: Mapping[str, int]) -> LaunchConfig:
    """The checks of one Δ call that read no tensor (the rule, the scale, the launch parameters), shared by the
    Δ and varlen ops; return the launch parameters as a LaunchConfig."""
    from .rule import check_rule_args      # here, not at the top: rule.py reads prompt_length_reason from this module

    check_scale(scale)
    check_rule_args(sink, window, gamma, correction)
    return LaunchConfig.from_kwargs(dict(launch))


def cu_seqlens_reason(name: str, dtype: torch.dtype, shape: Sequence[int], values: Sequence[int], total: int) -> str:
    """Why `values` cannot be the cumulative sequence offsets `name` of a packed tensor of `total` rows ("" if
    they can): int32 (as flash_attn_varlen_func takes them), 1-D, from 0, non-decreasing, ending at total."""
    if dtype != torch.int32:
        return f"{name} must be torch.int32 (as flash_attn_varlen_func takes it), got {name}.dtype={dtype}"
    if len(shape) != 1 or shape[0] < 2:
        return f"{name} must be 1-D with one offset per sequence and a last one, got {name}.shape={tuple(shape)}"
    if values[0] != 0:
        return f"{name} must start at 0, got {name}[0]={values[0]}"
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            return (f"{name} must be non-decreasing, got {name}[{i}]={values[i]} > "
                    f"{name}[{i + 1}]={values[i + 1]}")
    if values[-1] != total:
        return f"{name}[-1] must be the packed length {total}, got {name}[-1]={values[-1]}"
    return ""


def packed_reason(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> str:
    """Why q, k, v cannot be packed sequences [total, heads, head_dim] ("" if they can; each sequence's
    limits are unsupported_reason's)."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 3:
            return f"{name} must be 3-D [total_tokens, heads, head_dim] (packed sequences), got shape {tuple(shape)}"
    return ""
