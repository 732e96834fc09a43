"""The one exact reference of the Δ rule, in plain PyTorch.

Computes in the dtype it is given (float64 inputs give the truth the tests
use). Rows are processed in chunks and each chunk only scores the keys its
rows can see, so no N x N score matrix is ever built for all heads at once.
Grouped-query K/V are broadcast, never copied per query head.
"""
from __future__ import annotations

import math

import torch

from .rule import DeltaPlan, causal, sparse_keep

# Upper bound on score elements materialised per chunk (B * Hq * rows * keys).
_SCORE_BUDGET = 1 << 26


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
            keys: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of query rows (positions) over a key subset.

    q: [B, Hkv, G, N_q, D], the queries at positions N_k - N_q, ..., N_k - 1; k, v: [B, Hkv, 1, N_k, D];
    keep: [rows, keys] -> [B, Hkv, G, rows, D]
    """
    start = k.shape[-2] - q.shape[-2]
    scores = torch.matmul(q[..., rows - start, :], k[..., keys, :].transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v[..., keys, :])


def _rows_per_chunk(batch_heads: int, keys: int) -> int:
    return max(1, _SCORE_BUDGET // max(1, batch_heads * keys))


def sparse_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                sink: int, window: int, scale: float) -> torch.Tensor:
    """Sink + sliding-window attention for the given (sorted) rows. Grouped layout as in _attend."""
    batch_heads = q.shape[0] * q.shape[1] * q.shape[2]
    chunk = _rows_per_chunk(batch_heads, sink + window + 256)
    chunk = min(chunk, 256)
    parts = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        lo, hi = int(r[0]), int(r[-1]) + 1
        keys = torch.cat([
            torch.arange(0, min(sink, hi), device=r.device),
            torch.arange(min(hi, max(sink, lo - window + 1)), hi, device=r.device),
        ])
        keep = sparse_keep(r[:, None], keys[None, :], sink, window)
        parts.append(_attend(q, k, v, r, keys, keep, scale))
    return torch.cat(parts, dim=-2)


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Causal dense attention for the given (sorted) rows. Grouped layout as in _attend."""
    batch_heads = q.shape[0] * q.shape[1] * q.shape[2]
    chunk = _rows_per_chunk(batch_heads, k.shape[-2])
    parts = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        keys = torch.arange(0, int(r[-1]) + 1, device=r.device)
        keep = causal(r[:, None], keys[None, :])
        parts.append(_attend(q, k, v, r, keys, keep, scale))
    return torch.cat(parts, dim=-2)


def reference_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int,
                              window: int, gamma: int, correction: str = "delta",
                              scale: float | None = None, prompt_length: int | None = None) -> torch.Tensor:
    """Exact Δ attention. q [B, Hq, N_q, D], k/v [B, Hkv, N_k, D] -> [B, Hq, N_q, D] in q's dtype.

    Query i sits at position N_k - N_q + i of a prompt of prompt_length tokens (None: N_k); its row is
    the rule's (rule.py, including the rule at a chunk boundary).
    """
    batch, q_heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    plan = DeltaPlan(n_k, sink, window, gamma, correction, start=n_k - n_q, prompt_length=prompt_length)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = q_heads // kv_heads
    qg = q.unflatten(1, (kv_heads, group))
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)
    device = q.device
    start = plan.start

    out = q.new_empty(qg.shape)  # contiguous, whatever q's layout; row i holds position start + i
    sparse = torch.arange(start, plan.tail_start, device=device)
    if sparse.numel() > 0:
        out[..., :sparse.numel(), :] = sparse_rows(qg, kg, vg, sparse, sink, window, scale)
    if plan.n_dense_rows > 0:
        positions = plan.dense_row_positions(device)
        dense = dense_rows(qg, kg, vg, positions, scale)
        if plan.carries_delta:
            is_sample = plan.is_sample_row(positions)
            # Sample rows come first among the dense rows, in order: delta row s is sample row s.
            delta = dense[..., is_sample, :] - out[..., positions[is_sample] - start, :]
            out[..., :sparse.numel(), :] += delta[..., plan.anchor_sample(sparse), :]
        out[..., positions - start, :] = dense
    return out.flatten(1, 2)
