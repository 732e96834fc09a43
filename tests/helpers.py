"""Small shared helpers for the tests."""
from __future__ import annotations

import torch


def random_qkv(batch: int, q_heads: int, kv_heads: int, n: int, head_dim: int, dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random inputs; keys get a per-row offset so softmax is not flat."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, n, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def max_abs_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item()
