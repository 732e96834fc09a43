"""The Δ-attention rule: which keys each query row sees, which rows are exact.

This module is the one statement of the rule. The exact reference takes its
rows from DeltaPlan and its masks from the predicates below; the Triton
launcher reads every row count, key bound and flag from DeltaPlan. The Triton
kernels must place rows and mask keys on the device; they do that only in
small jit helpers (triton_delta.py) whose docstrings name the member of this
module they mirror, and tests/test_kernels.py checks each helper against that
member under Triton's interpreter. (The key ranges that the reference and the
kernels scan only bound these sets; tests against whole-matrix builds of the
rule check that they cover them.)

Rule (causal self-attention prefill over N tokens):
  * sparse row t sees keys j <= t with j < sink or t - j < window
    (StreamingLLM sink + sliding window, token exact);
  * tail = N mod gamma + max(128, gamma) rows (capped at N) are dense; s_p = N - tail
    (every correction but "none");
  * sample rows 0, gamma, 2*gamma, ... below s_p are dense too ("delta" and "recompute");
    the anchor of row t is the sample row gamma * (t // gamma);
  * correction "delta":     row t < s_p gets sparse(t) + dense(a) - sparse(a), a = anchor of t;
    correction "recompute": row t < s_p gets sparse(t), sample rows dense;
    correction "tail":      row t < s_p gets sparse(t); no sample rows, only the dense tail;
    correction "none":      every row gets sparse(t), no row is dense;
  * N <= sink + window: every row's sparse set is already its whole causal set,
    so the result is exact dense attention.

The predicates take ints or int tensors (row t, key j), in the style of
attention-gym's mask functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "delta", "recompute", "tail")
SAMPLED_CORRECTIONS = ("delta", "recompute")   # the corrections that compute sample rows
MIN_TAIL = 128
# sink, window and gamma cross the op schema as int64 and reach the kernels as int32.
MAX_RULE_ARG = 2**31 - 1


def causal(t, j):
    """Key j is visible to query row t."""
    return j <= t


def sink_or_window(t, j, sink: int, window: int):
    """Key j is an attention sink or lies in row t's sliding window."""
    return (j < sink) | (t - j < window)


def sparse_keep(t, j, sink: int, window: int):
    """The sparse part's mask: causal, and sink or window."""
    return causal(t, j) & sink_or_window(t, j, sink, window)


def tail_row(t, sparse_end: int):
    """Row t is a dense tail row: at or past s_p."""
    return t >= sparse_end


def sample_row(t, gamma: int, n_samples: int):
    """Row t is a sample row: a multiple of gamma, one of the first n_samples of them."""
    return (t % gamma == 0) & (t // gamma < n_samples)


def anchor_row(t, gamma: int):
    """The sample row whose delta row t receives: gamma * (t // gamma)."""
    return t // gamma * gamma


def check_rule_args(sink: int, window: int, gamma: int, correction: str) -> None:
    """Raise ValueError naming the argument and value that break the rule's domain."""
    for name, value in (("sink", sink), ("window", window), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if value > MAX_RULE_ARG:
            raise ValueError(f"{name} must be <= 2**31 - 1 (the kernels take it as int32), got {name}={value}")
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

    # ---- the rule's rows ----

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
        """Sample rows 0, gamma, ... below s_p (0 unless the correction computes them)."""
        if self.correction not in SAMPLED_CORRECTIONS or self.exact:
            return 0
        return -(-self.sparse_end // self.gamma)

    @property
    def n_dense_rows(self) -> int:
        """Rows computed with dense attention: sample rows, then tail rows."""
        return self.n_samples + self.tail

    def is_tail_row(self, t):
        return tail_row(t, self.sparse_end)

    def is_sample_row(self, t):
        return sample_row(t, self.gamma, self.n_samples)

    def anchor_row(self, t):
        return anchor_row(t, self.gamma)

    def dense_row_position(self, r: torch.Tensor) -> torch.Tensor:
        """Sequence position of dense row r (int tensor): the sample rows first, then the tail rows."""
        return torch.where(r < self.n_samples, r * self.gamma, self.sparse_end + r - self.n_samples)

    def dense_row_positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sequence positions of all dense rows, sample rows first (int64)."""
        return self.dense_row_position(torch.arange(self.n_dense_rows, device=device, dtype=torch.int64))

    # ---- what the Triton launcher runs ----
    # In the exact case the sparse kernel computes every row, with a window that covers all of them
    # and no sink (one key segment); the dense-rows kernel is not launched.

    @property
    def carries_delta(self) -> bool:
        """Sample rows also compute their sparse result, and rows below s_p add their anchor's delta."""
        return self.correction == "delta" and self.n_samples > 0

    @property
    def sparse_kernel_rows(self) -> int:
        """The sparse kernel covers rows [0, sparse_kernel_rows)."""
        return self.n if self.exact else self.sparse_end

    @property
    def sparse_kernel_sink(self) -> int:
        return 0 if self.exact else self.sink

    @property
    def sparse_kernel_window(self) -> int:
        return self.n if self.exact else self.window

    @property
    def sparse_kernel_skips_samples(self) -> bool:
        """The sparse kernel leaves the sample rows to the dense-rows kernel."""
        return self.n_samples > 0

    @property
    def dense_kernel_rows(self) -> int:
        """The dense-rows kernel covers dense rows [0, dense_kernel_rows) (see dense_row_position)."""
        return 0 if self.exact else self.n_dense_rows

    def attended_keys(self) -> tuple[int, int]:
        """(sparse key count summed over sparse rows, dense key count summed over dense rows).

        Sample rows under "delta" count in both: their sparse result is needed for delta.
        Used to count the FLOPs of the rule (4 * D per query-key pair and head).
        """
        rows = torch.arange(self.sparse_end, dtype=torch.int64)
        keys = (rows + 1).clamp(max=self.sink + self.window)
        if not self.carries_delta:
            keys = keys[~self.is_sample_row(rows)]
        dense_keys = self.dense_row_positions() + 1
        return int(keys.sum()), int(dense_keys.sum())
