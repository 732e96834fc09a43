"""The Δ-attention rule: which keys each query row sees, which rows are exact.

Everything here is plain Python / torch index math shared by the exact
reference, the CPU path and the Triton launcher, so the three cannot drift.

Rule (causal self-attention prefill over N tokens):
  * sparse row t sees keys j <= t with j < sink or t - j < window
    (StreamingLLM sink + sliding window, token exact);
  * tail = N mod gamma + max(128, gamma) rows (capped at N) are dense; s_p = N - tail;
  * rows 0, gamma, 2*gamma, ... below s_p ("sample rows") are dense too;
  * correction "delta":     row t < s_p gets sparse(t) + dense(g) - sparse(g), g = gamma * (t // gamma);
    correction "recompute": row t < s_p gets sparse(t), sample rows dense;
    correction "none":      every row gets sparse(t), no row is dense;
  * N <= sink + window: every row's sparse set is already its whole causal set,
    so the result is exact dense attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "delta", "recompute")
MIN_TAIL = 128


def causal(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Key j is visible to query row t."""
    return j <= t


def sink_or_window(t: torch.Tensor, j: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Key j is an attention sink or lies in row t's sliding window."""
    return (j < sink) | (t - j < window)


def sparse_keep(t: torch.Tensor, j: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """The sparse part's mask: causal, and sink or window."""
    return causal(t, j) & sink_or_window(t, j, sink, window)


def check_rule_args(sink: int, window: int, gamma: int, correction: str) -> None:
    """Raise ValueError naming the argument and value that break the rule's domain."""
    for name, value in (("sink", sink), ("window", window), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got sink={sink}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got window={window}")
    if sink + window < 1:
        raise ValueError(f"sink + window must be >= 1 (every row needs a key), got sink={sink}, window={window}")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got gamma={gamma}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got correction={correction!r}")


@dataclass(frozen=True)
class DeltaPlan:
    """Row bookkeeping of the rule for one sequence length."""

    n: int
    sink: int
    window: int
    gamma: int
    correction: str

    def __post_init__(self) -> None:
        check_rule_args(self.sink, self.window, self.gamma, self.correction)
        if self.n < 1:
            raise ValueError(f"sequence length must be >= 1, got N={self.n}")

    @property
    def exact(self) -> bool:
        """Every row's sparse set is its full causal set: plain dense attention."""
        return self.n <= self.sink + self.window

    @property
    def tail(self) -> int:
        """Number of trailing dense rows."""
        if self.exact:
            return self.n
        if self.correction == "none":
            return 0
        return min(self.n, self.n % self.gamma + max(MIN_TAIL, self.gamma))

    @property
    def sparse_end(self) -> int:
        """s_p: rows below it are sparse (plus correction); rows from it on are dense."""
        return self.n - self.tail

    @property
    def n_samples(self) -> int:
        """Sample rows 0, gamma, ... below s_p (0 when there is no correction)."""
        if self.correction == "none" or self.exact:
            return 0
        return -(-self.sparse_end // self.gamma)

    @property
    def n_dense_rows(self) -> int:
        """Rows computed with dense attention: sample rows, then tail rows."""
        return self.n_samples + self.tail

    def dense_row_positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sequence positions of the dense rows, sample rows first (int64)."""
        samples = torch.arange(self.n_samples, device=device, dtype=torch.int64) * self.gamma
        tail = torch.arange(self.sparse_end, self.n, device=device, dtype=torch.int64)
        return torch.cat([samples, tail])

    def attended_keys(self) -> tuple[int, int]:
        """(sparse key count summed over sparse rows, dense key count summed over dense rows).

        Sample rows under "delta" count in both: their sparse result is needed for delta.
        Used to count the FLOPs of the rule (4 * D per query-key pair and head).
        """
        rows = torch.arange(self.sparse_end, dtype=torch.int64)
        keys = (rows + 1).clamp(max=self.sink + self.window)
        if self.correction == "recompute":
            keys = keys[rows % self.gamma != 0]
        dense_keys = self.dense_row_positions() + 1
        return int(keys.sum()), int(dense_keys.sum())
