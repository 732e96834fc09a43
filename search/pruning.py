"""Stopping a trial early: successive halving over the retrieval tasks, by hand.

Optuna's pruners (median, successive halving, Hyperband) read `trial.report`, which multi-objective studies
do not support, so the tuner halves by hand. A trial first runs a slice of the retrieval tasks: every other
task of each retrieval kind (so the slice spans the needle depths). It is stopped there when, for one kind,
its retrieval cannot reach the budget:
  - certainly: even answering every task left, its accuracy would stay below min_retrieval x dense's; or
  - beyond the slice's noise: the upper end of the 95% Wilson interval of its accuracy on the slice is below
    min_retrieval x dense's.
Retrieval is the worse kind's ratio to dense, so one kind out of reach is enough. The first rule never stops
a trial that would have met the budget; the second can (a good config whose misses fell in the slice): that
is the price of the saving, see docs/TUNING.md. Dense's accuracy is the full task set's, measured once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .harness import Evaluation, Score, _wilson
from .tasks import Task

RETRIEVAL_KINDS = ("passkey", "multikey")


@dataclass(frozen=True)
class Slice:
    """The tasks a trial runs first, and the rest."""

    first: list[Task]
    rest: list[Task]


def first_slice(tasks: Sequence[Task]) -> Slice:
    """Every other retrieval task of each kind (the 1st, 3rd, ...: they span the depths), then everything else."""
    seen: dict[str, int] = {}
    first, rest = [], []
    for task in tasks:
        index = seen.get(task.kind, 0)
        seen[task.kind] = index + 1
        (first if task.kind in RETRIEVAL_KINDS and index % 2 == 0 else rest).append(task)
    return Slice(first, rest)


def out_of_reach(partial: Evaluation, dense: Evaluation, totals: dict[str, int], min_retrieval: float) -> str | None:
    """Why the trial's retrieval cannot reach `min_retrieval` of dense, judged on the slice `partial`; None if it can.

    totals: the number of tasks of each kind in the full set (the slice's plus the rest).
    """
    for kind in RETRIEVAL_KINDS:
        got, base = partial.score(kind), dense.score(kind)
        if got is None or base is None or base.value <= 0:
            continue                     # dense answers none of this kind: it cannot rank configs
        need = min_retrieval * base.value
        correct = round(got.value * got.n)
        best = (correct + totals[kind] - got.n) / totals[kind]
        if best < need:
            return (f"{kind}: {correct}/{got.n} on the first slice; even all {totals[kind] - got.n} left right "
                    f"gives {best:.3f}, below {min_retrieval:g} x dense's {base.value:.3f}")
        if got.high < need:
            return (f"{kind}: {correct}/{got.n} on the first slice, 95% interval up to {got.high:.3f}, below "
                    f"{min_retrieval:g} x dense's {base.value:.3f}")
    return None


def pooled(first: Evaluation, rest: Evaluation) -> Evaluation:
    """One evaluation of two disjoint task sets of one config: retrieval cells pooled (their Wilson intervals
    recomputed), other cells from whichever part has them (a kind in both parts must be retrieval)."""
    cells: dict[tuple[str, int], Score] = {}
    for score in [*first.scores, *rest.scores]:
        key = (score.kind, score.length)
        if key not in cells:
            cells[key] = score
            continue
        if score.kind not in RETRIEVAL_KINDS:
            raise ValueError(f"kind {score.kind!r} at {score.length} tokens is in both parts; only retrieval pools")
        other = cells[key]
        n = other.n + score.n
        value = (other.value * other.n + score.value * score.n) / n
        cells[key] = Score(score.kind, score.length, n, value, *_wilson(value, n))
    return Evaluation(config=first.config, label=first.label, scores=list(cells.values()),
                      density={**first.density, **rest.density}, seconds=first.seconds + rest.seconds)


class Stopped(Exception):
    """A trial stopped on its first slice; `evaluated` tasks ran, `reason` says why."""

    def __init__(self, reason: str, evaluated: int, partial: Evaluation) -> None:
        super().__init__(reason)
        self.reason, self.evaluated, self.partial = reason, evaluated, partial


def evaluate_halving(run: Callable[[list[Task]], Evaluation], tasks: Sequence[Task], dense: Evaluation,
                     min_retrieval: float, report: Callable[[Evaluation], None] | None = None) -> Evaluation:
    """run(tasks) for one config, the first slice first: raises Stopped when the budget is out of reach there.

    report: called with the slice's evaluation (the trial's intermediate value) before the decision.
    """
    if not 0 <= min_retrieval or math.isnan(min_retrieval):
        raise ValueError(f"min_retrieval must be a number >= 0, got min_retrieval={min_retrieval!r}")
    part = first_slice(tasks)
    if not part.first:
        return run(list(tasks))
    partial = run(part.first)
    if report is not None:
        report(partial)
    totals = {kind: sum(t.kind == kind for t in tasks) for kind in RETRIEVAL_KINDS}
    reason = out_of_reach(partial, dense, totals, min_retrieval)
    if reason is not None:
        raise Stopped(reason, len(part.first), partial)
    return pooled(partial, run(part.rest)) if part.rest else partial
