"""Successive halving over the retrieval tasks (search/pruning.py) and how stopped trials count in a study."""
from __future__ import annotations

import optuna
import pytest
import torch

from deltapass.search.harness import Evaluation, Score, _wilson
from deltapass.search.pruning import Stopped, evaluate_halving, first_slice, pooled
from deltapass.search.tasks import Task
from deltapass.search.tune import STOPPED_ATTR, finished_trials, run_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)
SAMPLES = 8


def tasks(samples: int = SAMPLES) -> list[Task]:
    ids = torch.zeros(4, dtype=torch.long)
    return [Task(kind, 4096, (i + 0.5) / samples if kind != "continuation" else None, ids,
                 "" if kind == "continuation" else str(1000 + i), ids if kind == "continuation" else None, 0)
            for kind in ("passkey", "multikey", "continuation") for i in range(samples)]


class Stub:
    """evaluate() of a config that misses the retrieval tasks at the given depth indices; records what ran."""

    def __init__(self, misses: set[int]) -> None:
        self.misses, self.ran = misses, []

    def __call__(self, part: list[Task]) -> Evaluation:
        self.ran += part
        e = Evaluation(config=None, label="stub")
        for kind in ("passkey", "multikey", "continuation"):
            group = [t for t in part if t.kind == kind]
            if not group:
                continue
            if kind == "continuation":
                e.scores.append(Score(kind, 4096, len(group), 2.5, 2.4, 2.6))
                continue
            right = [round(t.depth * SAMPLES - 0.5) not in self.misses for t in group]
            value = sum(right) / len(right)
            e.scores.append(Score(kind, 4096, len(right), value, *_wilson(value, len(right))))
        return e


DENSE = Stub(set())(tasks())


def test_the_first_slice_is_every_other_retrieval_task_of_each_kind():
    every = tasks()
    part = first_slice(every)
    assert [(t.kind, t.answer) for t in part.first] == [(k, str(1000 + i)) for k in ("passkey", "multikey")
                                                        for i in range(0, SAMPLES, 2)]
    assert sorted(map(id, part.first + part.rest)) == sorted(map(id, every))      # each task once


def test_a_clearly_failing_trial_stops_on_its_first_slice():
    stub = Stub(misses={0, 2, 4, 6})                     # misses every task of the slice
    with pytest.raises(Stopped) as stopped:
        evaluate_halving(stub, tasks(), DENSE, 0.95)
    assert len(stub.ran) == stopped.value.evaluated == SAMPLES < 3 * SAMPLES     # 8 of 24 tasks ran
    assert {t.kind for t in stub.ran} == {"passkey", "multikey"}
    assert "passkey: 0/4 on the first slice" in stopped.value.reason


def test_one_miss_stops_a_trial_only_when_the_budget_is_then_out_of_reach():
    # With 8 tasks a kind and dense 8/8, one miss is 7/8 = 0.875 < 0.95: certain to fail.
    with pytest.raises(Stopped, match="even all 4 left right gives 0.875, below 0.95"):
        evaluate_halving(Stub(misses={2}), tasks(), DENSE, 0.95)
    # At a budget of 0.8 one miss in the slice can still end at 7/8; the slice's interval allows it: it runs on.
    stub = Stub(misses={2})
    e = evaluate_halving(stub, tasks(), DENSE, 0.8)
    assert len(stub.ran) == 3 * SAMPLES
    assert e.score("passkey").n == SAMPLES and e.score("passkey").value == 7 / 8


def test_a_good_trial_runs_every_task_and_scores_as_one_evaluation():
    stub, every = Stub(misses={3}), tasks()              # a miss outside the slice: 7/8 overall
    reported = []
    e = evaluate_halving(stub, every, DENSE, 0.8, report=reported.append)
    assert sorted(map(id, stub.ran)) == sorted(map(id, every))                      # each task once
    assert [s.n for s in reported[0].scores] == [4, 4]   # the intermediate value: the slice's scores
    whole = Stub(misses={3})(tasks())
    assert [(s.kind, s.n, s.value, s.low, s.high) for s in e.scores] == \
        [(s.kind, s.n, s.value, s.low, s.high) for s in whole.scores]


def test_pooling_refuses_a_continuation_cell_in_both_parts():
    half = Stub(set())(tasks()[-2:])
    with pytest.raises(ValueError, match="kind 'continuation' at 4096 tokens is in both parts"):
        pooled(half, half)


def test_stopped_trials_count_towards_trials_and_repeats_do_not():
    """run_trials ends with exactly `trials` finished trials, stopped ones included; pruned repeats are retried."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    calls = []

    def objective(trial):
        x = trial.suggest_int("x", 0, 1000)
        calls.append(x)
        if len(calls) % 3 == 0:
            raise optuna.TrialPruned("a repeat")                     # pruned unrun: does not count
        if len(calls) % 2 == 0:
            trial.set_user_attr(STOPPED_ATTR, {"tasks": 8, "of": 24, "reason": "test"})
            raise optuna.TrialPruned("stopped on its first slice")
        return 1.0, 0.0, float(x)

    run_trials(study, objective, 6, poll=0.01)
    finished = finished_trials(study)
    assert len(finished) == 6
    states = [t.state for t in study.trials]
    stopped = [t for t in study.trials if STOPPED_ATTR in t.user_attrs]
    assert stopped and all(t.state == optuna.trial.TrialState.PRUNED for t in stopped)
    assert states.count(optuna.trial.TrialState.PRUNED) > len(stopped)       # the repeats were pruned too
    assert len(study.trials) == len(calls)
