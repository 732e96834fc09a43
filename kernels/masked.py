"""Δ attention behind a run-time mask check, for attention whose mask comes from the model's inputs.

A model that builds its mask from inputs (Hugging Face generate() passes an
attention_mask, for instance) cannot be proven causal at compile time. These
ops decide per call instead: `mask_is_causal` reads the mask once and says whether
it keeps exactly the causal keys; `delta_attention_masked` then runs Δ attention,
or, for any other mask (padding, sliding window, bias), exact attention with that
very mask. `exact_attention_masked` is the same decision for a site that stays
exact: plain causal attention (no N x N mask read by the attention) when the mask
is exactly causal, else the mask as given.

Causal means bottom-right causal, the op's convention: a mask [..., N_q, N_k] with
N_q <= N_k (a chunk of a prompt over a KV cache, decode) is causal when query row i
keeps exactly the keys j <= N_k - N_q + i. The same check serves the pass's proof at
compile time (deltapass/sites.py) and the per-call check.
"""
from __future__ import annotations

import torch

from .launch import LaunchConfig, launch_schema
from .limits import check_delta_call, check_scale
from .op import _forward, in_output_layout, output_like
from .prompt import prompt_length_for_call

# How a mask encodes the keys a query may attend:
#   keep     - bool, True = attend             (SDPA's boolean attn_mask, torch.where(mask, scores, -inf))
#   blocked  - bool, True = masked out         (scores.masked_fill(mask, -inf))
#   additive - float, 0 = attend, <= -1e4 = masked out (scores + mask)
MASK_KINDS = ("keep", "blocked", "additive")
BLOCKED_BELOW = -1e4           # an additive value this low is a mask, not a bias: exp() of it underflows
_CHECK_ELEMENTS = 1 << 26      # rows per check chunk are sized so a chunk's temporaries stay ~64 MB


def check_mask(mask: torch.Tensor, kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got mask_kind={kind!r}")
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        raise ValueError(f"mask must be a tensor [..., q_len, k_len], got {type(mask).__name__} "
                         f"of shape {tuple(getattr(mask, 'shape', ()))}")
    if kind in ("keep", "blocked") and mask.dtype != torch.bool:
        raise ValueError(f"a {kind!r} mask must be torch.bool, got mask.dtype={mask.dtype}")
    if kind == "additive" and not mask.dtype.is_floating_point:
        raise ValueError(f"an 'additive' mask must be floating point, got mask.dtype={mask.dtype}")


def keeps_exactly_causal(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """A 0-dim bool tensor: True when mask [..., N_q, N_k] (every batch and head) keeps exactly the bottom-right
    causal keys, row i the keys j <= N_k - N_q + i (for N_q = N_k the causal triangle); False when N_q > N_k."""
    n_q, n_k = mask.shape[-2:]
    if n_q > n_k:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    offset = n_k - n_q                 # the chunk's first query position
    # Broadcast (stride-0) batch/head dims hold one mask: check it once.
    lead = tuple(0 if mask.stride(d) == 0 else slice(None) for d in range(mask.dim() - 2))
    mask = mask[lead + (Ellipsis,)]
    rows = max(1, _CHECK_ELEMENTS // max(1, n_k * max(1, mask[..., 0, 0].numel())))
    cols = torch.arange(n_k, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, n_q, rows):
        chunk = mask[..., r0:r0 + rows, :]
        causal = cols <= torch.arange(offset + r0, offset + r0 + chunk.shape[-2], device=mask.device)[:, None]
        if kind == "keep":
            exact = chunk == causal
        elif kind == "blocked":
            exact = chunk != causal
        else:
            exact = torch.where(causal, chunk == 0, chunk <= BLOCKED_BELOW)
        ok &= exact.all()
    return ok


def _check_masked_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, mask_kind: str,
                       sink: int, window: int, gamma: int, correction: str, scale: float | None,
                       launch: dict, prompt_length: int | None) -> LaunchConfig:
    """The masked Δ op's checks (kernels/limits.py's and the mask's), for its wrapper, real and fake impls."""
    config = check_delta_call(q, k, v, sink, window, gamma, correction, scale, launch, prompt_length)
    check_mask(mask, mask_kind)
    return config


# Each op checks what its wrapper checks, in its real and its fake impl (torch.compile then fails at trace time).
@torch.library.custom_op("deltapass::mask_is_causal", mutates_args=())
def _mask_is_causal_op(mask: torch.Tensor, kind: str) -> torch.Tensor:
    check_mask(mask, kind)
    return keeps_exactly_causal(mask, kind)


@_mask_is_causal_op.register_fake
def _(mask, kind):
    check_mask(mask, kind)
    return mask.new_empty((), dtype=torch.bool)


def mask_is_causal(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """A 0-dim bool tensor: does `mask` ([..., N_q, N_k], every batch and head) keep exactly the bottom-right
    causal keys (keeps_exactly_causal)?"""
    check_mask(mask, kind)
    return _mask_is_causal_op(mask, kind)


def exact_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, kind: str,
                           scale: float | None) -> torch.Tensor:
    """softmax(q kᵀ scale + mask) v with the mask as given: what the model computes without the pass."""
    if kind == "blocked":
        mask = ~mask
    elif kind == "additive" and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


# The host reads the mask check's result, so a CUDA graph cannot capture this op: the tag makes Inductor's
# mode="reduce-overhead" run it outside the graphs (or skip graphs) instead of failing at capture.
_CUDAGRAPH_UNSAFE = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


DELTA_ATTENTION_MASKED_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor mask, str mask_kind, Tensor mask_causal, int sink, int window, "
    f"int gamma, str correction, float? scale, int? prompt_length=None, {launch_schema()}) -> Tensor")


@torch.library.custom_op("deltapass::delta_attention_masked", mutates_args=(), tags=_CUDAGRAPH_UNSAFE,
                         schema=DELTA_ATTENTION_MASKED_SCHEMA)
def _delta_attention_masked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               mask_kind: str, mask_causal: torch.Tensor, sink: int, window: int, gamma: int,
                               correction: str, scale: float | None, prompt_length: int | None = None,
                               **launch: int) -> torch.Tensor:
    prompt_length = prompt_length_for_call(prompt_length)      # as the Δ op: read per call when not given
    config = _check_masked_call(q, k, v, mask, mask_kind, sink, window, gamma, correction, scale, launch,
                                prompt_length)
    # One host sync per call: the branch is data dependent by design.
    if bool(mask_causal):
        return _forward(q, k, v, sink, window, gamma, correction, scale, config, prompt_length)
    return in_output_layout(exact_masked_attention(q, k, v, mask, mask_kind, scale), q)


@_delta_attention_masked_op.register_fake
def _(q, k, v, mask, mask_kind, mask_causal, sink, window, gamma, correction, scale, prompt_length=None, **launch):
    _check_masked_call(q, k, v, mask, mask_kind, sink, window, gamma, correction, scale, launch, prompt_length)
    return output_like(q)


def delta_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                           mask_kind: str, sink: int, window: int, gamma: int, correction: str = "delta",
                           scale: float | None = None, mask_causal: torch.Tensor | None = None,
                           prompt_length: int | None = None, **launch: int) -> torch.Tensor:
    """delta_attention(q, k, v, ..., prompt_length) when `mask` keeps exactly the bottom-right causal keys,
    else exact attention under `mask`.

    q: [B, Hq, N_q, D]; k, v: [B, Hkv, N_k, D], N_q <= N_k (a chunk of a prompt over a KV cache when
    N_q < N_k; queries bottom-right, as delta_attention); mask: broadcastable to [B, Hq, N_q, N_k], encoded
    as mask_kind (see MASK_KINDS). mask_causal: the result of mask_is_causal(mask, mask_kind), computed here
    when None; a model whose layers share one mask checks it once and passes the flag to each layer.
    prompt_length: as delta_attention's (None: a deltapass.kernels.prompt_length() block's, else N_k).
    """
    config = _check_masked_call(q, k, v, mask, mask_kind, sink, window, gamma, correction, scale, launch,
                                prompt_length)
    if mask_causal is None:
        mask_causal = mask_is_causal(mask, mask_kind)
    return _delta_attention_masked_op(q, k, v, mask, mask_kind, mask_causal, sink, window, gamma, correction,
                                      None if scale is None else float(scale), prompt_length, **config.to_dict())


@torch.library.custom_op("deltapass::exact_attention_masked", mutates_args=(), tags=_CUDAGRAPH_UNSAFE)
def _exact_attention_masked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               mask_kind: str, mask_causal: torch.Tensor, scale: float | None) -> torch.Tensor:
    check_mask(mask, mask_kind)
    check_scale(scale)
    # One host sync per call, as in the masked Δ op. SDPA's is_causal aligns top-left, so a causal chunk
    # (N_q < N_k) takes its mask as given.
    if q.shape[2] == k.shape[2] and bool(mask_causal):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                               enable_gqa=True)
    else:
        out = exact_masked_attention(q, k, v, mask, mask_kind, scale)
    return out.contiguous()


@_exact_attention_masked_op.register_fake
def _(q, k, v, mask, mask_kind, mask_causal, scale):
    check_mask(mask, mask_kind)
    check_scale(scale)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def exact_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                           mask_kind: str, scale: float | None = None,
                           mask_causal: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention under `mask`, without reading an N x N mask when it keeps exactly the causal keys.

    q: [B, Hq, N_q, D]; k, v: [B, Hkv, N_k, D] with Hq % Hkv == 0; mask: broadcastable to
    [B, Hq, N_q, N_k], encoded as mask_kind (see MASK_KINDS). mask_causal as in delta_attention_masked.
    Equals exact_masked_attention(q, k, v, mask, mask_kind, scale) up to rounding.
    """
    check_mask(mask, mask_kind)
    check_scale(scale)
    if mask_causal is None:
        mask_causal = mask_is_causal(mask, mask_kind)
    return _exact_attention_masked_op(q, k, v, mask, mask_kind, mask_causal, None if scale is None else float(scale))
