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

Rule (causal self-attention prefill of a prompt of L tokens; positions are the prompt's):
  * sparse row t sees keys j <= t with j < sink or t - j < window
    (StreamingLLM sink + sliding window, token exact);
  * tail = L mod gamma + max(128, gamma) rows (capped at L) are dense; s_p = L - tail
    (every correction but "none");
  * sample rows 0, gamma, 2*gamma, ... below s_p are dense too ("delta" and "recompute");
    the anchor of row t is the sample row gamma * (t // gamma);
  * correction "delta":     row t < s_p gets sparse(t) + dense(a) - sparse(a), a = anchor of t;
    correction "recompute": row t < s_p gets sparse(t), sample rows dense;
    correction "tail":      row t < s_p gets sparse(t); no sample rows, only the dense tail;
    correction "none":      every row gets sparse(t), no row is dense;
  * L <= sink + window: every row's sparse set is already its whole causal set,
    so the result is exact dense attention.

A chunk of the prompt (chunked prefill over a KV cache): the rows at positions [start, n) over the
keys [0, n), n <= L. Every row is the row of the rule over the whole L-token prompt (s_p, the tail and
the sample rows are the prompt's, so an earlier chunk has tail rows only where the prompt's tail reaches
into it), with one exception at a chunk boundary that is not a multiple of gamma: the rows of the
chunk's first gamma block would take their delta from a sample row in an earlier chunk, whose query the
chunk does not have. There the chunk's first row `start` becomes a sample row of its own (computed dense
and sparse), and those rows take their delta from it: anchor(t) = max(start, gamma * (t // gamma)).
Chunks whose boundaries are multiples of gamma therefore give exactly the rows of one call over the
whole prompt; others differ (by design, and only under "delta" and "recompute") in the rows of each
chunk's first gamma block.

The predicates take ints or int tensors (row t, key j), in the style of
attention-gym's mask functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .limits import prompt_length_reason

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


def sample_row(t, gamma: int, n_samples: int, start: int = 0):
    """Row t is a sample row: one of the n_samples rows start, then the multiples of gamma after it
    (0, gamma, 2 * gamma, ... for a whole prompt)."""
    return (t >= start) & ((t % gamma == 0) | (t == start)) & (t // gamma - start // gamma < n_samples)


def anchor_row(t, gamma: int, start: int = 0):
    """The sample row whose delta row t receives: gamma * (t // gamma), or the chunk's first row `start`
    when that multiple of gamma lies before the chunk."""
    anchor = t // gamma * gamma
    return anchor.clamp(min=start) if isinstance(anchor, torch.Tensor) else max(anchor, start)


def anchor_sample(t, gamma: int, start: int = 0):
    """The index of row t's anchor among the sample rows (its row of the delta buffer)."""
    return t // gamma - start // gamma


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
    """Row bookkeeping of the rule for the rows [start, n) over the keys [0, n) of an L-token prompt.

    n: key count, and one past the last row; start: the first row (0 for a whole prompt, n - N_q for a
    chunk of N_q queries); prompt_length: L (None: n, the chunk ends the prompt). Positions are the
    prompt's throughout; row and sample counts are the chunk's.
    """

    n: int
    sink: int
    window: int
    gamma: int
    correction: str
    start: int = 0
    prompt_length: int | None = None

    def __post_init__(self) -> None:
        check_rule_args(self.sink, self.window, self.gamma, self.correction)
        if self.n < 1:
            raise ValueError(f"sequence length must be >= 1, got N={self.n}")
        if not 0 <= self.start < self.n:
            raise ValueError(f"start must be in [0, N) (the chunk's first query position), got start={self.start}, "
                             f"N={self.n}")
        if self.prompt_length is None:
            object.__setattr__(self, "prompt_length", self.n)
        reason = prompt_length_reason(self.prompt_length, self.n)
        if reason:
            raise ValueError(reason)

    # ---- the rule's rows ----

    @property
    def exact(self) -> bool:
        """Every row's sparse set is its full causal set: plain dense attention."""
        return self.prompt_length <= self.sink + self.window

    @property
    def rows(self) -> int:
        """Query rows of this plan: positions [start, n)."""
        return self.n - self.start

    @property
    def sparse_end(self) -> int:
        """s_p, a position of the prompt: rows below it are sparse (plus correction); rows from it on are dense."""
        if self.exact:
            return 0
        if self.correction == "none":
            return self.prompt_length
        tail = min(self.prompt_length, self.prompt_length % self.gamma + max(MIN_TAIL, self.gamma))
        return self.prompt_length - tail

    @property
    def tail(self) -> int:
        """Number of dense tail rows among this plan's rows (the prompt's tail rows that fall in [start, n))."""
        return self.n - self.tail_start

    @property
    def tail_start(self) -> int:
        """Position of this plan's first tail row (n when it has none)."""
        return min(self.n, max(self.start, self.sparse_end))

    @property
    def n_samples(self) -> int:
        """Sample rows among this plan's rows below s_p: start, then the multiples of gamma after it
        (0 unless the correction computes them)."""
        if self.correction not in SAMPLED_CORRECTIONS or self.exact or self.start >= self.sparse_end:
            return 0
        return -(-min(self.n, self.sparse_end) // self.gamma) - self.start // self.gamma

    @property
    def n_dense_rows(self) -> int:
        """Rows computed with dense attention: sample rows, then tail rows."""
        return self.n_samples + self.tail

    def is_tail_row(self, t):
        return tail_row(t, self.sparse_end)

    def is_sample_row(self, t):
        return sample_row(t, self.gamma, self.n_samples, self.start)

    def anchor_row(self, t):
        return anchor_row(t, self.gamma, self.start)

    def anchor_sample(self, t):
        """The delta buffer row (the anchor's index among the sample rows) that row t adds."""
        return anchor_sample(t, self.gamma, self.start)

    def dense_row_position(self, r: torch.Tensor) -> torch.Tensor:
        """Position of dense row r (int tensor): the sample rows first, then the tail rows."""
        sample = ((self.start // self.gamma + r) * self.gamma).clamp(min=self.start)
        return torch.where(r < self.n_samples, sample, self.tail_start + r - self.n_samples)

    def dense_row_positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions of all dense rows, sample rows first (int64)."""
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
        """The sparse kernel covers the rows at positions [start, start + sparse_kernel_rows)."""
        return self.rows if self.exact else self.tail_start - self.start

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
        rows = torch.arange(self.start, self.tail_start, dtype=torch.int64)
        keys = (rows + 1).clamp(max=self.sink + self.window)
        if not self.carries_delta:
            keys = keys[~self.is_sample_row(rows)]
        dense_keys = self.dense_row_positions() + 1
        return int(keys.sum()), int(dense_keys.sum())
