"""The tuner's trial loop: --trials counts completed trials; failures are retried, then given up on."""


def test_failed_trials_do_not_count_towards_the_trials_asked_for():
    import optuna

    from deltapass.search.tune import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    calls = []

    def objective(trial):
        calls.append(trial.number)
        if len(calls) % 3 == 1:                     # every third trial fails, the first among them
            raise RuntimeError("out of memory")
        return trial.suggest_float("x", 0, 1)

    assert run_trials(study, objective, 4) == 2
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 2

    def always_fails(trial):
        raise RuntimeError("broken")

    stuck = optuna.create_study()
    assert run_trials(stuck, always_fails, 4, max_failed=3) == 4    # gives up after max_failed + 1


# Workers of one journal study through the tuner's trial loop. Every process seeds its sampler alike (the
# tuner's default before per-process seeds): the loop must still run no parameters twice.
WORKER = r"""
import sys, time
import optuna
from deltapass.search.storage import load_or_create_study, open_storage
from deltapass.search.tune import prune_if_repeated, run_trials

journal, trials = sys.argv[1], int(sys.argv[2])
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = load_or_create_study("shared", open_storage(journal), ["minimize"],
                             sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))

def objective(trial):
    x = trial.suggest_int("x", 0, 30)
    kind = trial.suggest_categorical("kind", ["a", "b", "c"])
    prune_if_repeated(trial)
    time.sleep(0.3)
    return float((x - 7) ** 2 + (kind != "b"))

run_trials(study, objective, trials, poll=0.1)
"""


def _complete(journal, name="shared"):
    import optuna

    from deltapass.search.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(journal))
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_two_workers_and_a_resumed_run_end_with_exactly_the_trials_asked_for_and_no_repeats(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    journal = tmp_path / "journal.log"

    def workers(count: int, trials: int) -> None:
        procs = [subprocess.Popen([sys.executable, str(script), str(journal), str(trials)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(count)]
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-3000:]

    workers(2, 8)
    complete = _complete(journal)
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(complete) == 8, f"{len(complete)} complete trials for 8 asked for"
    assert len(set(params)) == 8, f"repeated parameters: {sorted(params)}"
    workers(1, 12)                                    # a resumed run, its sampler seeded as the first ones
    complete = _complete(journal)
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(complete) == 12 and len(set(params)) == 12, sorted(params)


def test_a_worker_waits_for_running_trials_that_would_fill_the_study():
    """Another worker's running trial may complete the study: this one starts no trial beyond it."""
    import threading
    import time

    import optuna

    from deltapass.search.tune import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    elsewhere = study.ask()                           # running in another worker
    elsewhere.suggest_float("x", 0, 1)
    done = threading.Thread(target=run_trials, args=(study, lambda t: t.suggest_float("x", 0, 1), 2),
                            kwargs={"poll": 0.05})
    done.start()
    time.sleep(0.5)
    assert done.is_alive() and len(study.trials) == 2, "it waits, and starts no trial of its own"
    study.tell(elsewhere, 0.5)
    done.join(timeout=30)
    assert not done.is_alive()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    run_trials(study, lambda t: t.suggest_float("x", 0, 1), 3)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_a_surplus_trial_is_pruned_unrun(monkeypatch):
    """Two workers ask for the last trial at the same moment: the later-numbered one does not run."""
    import optuna

    from deltapass.search.tune import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    ask, elsewhere, ran = study.ask, [], []

    def racing_ask(*args, **kwargs):
        if not elsewhere:                             # another worker's ask lands just before this one's
            elsewhere.append(ask())
            elsewhere[0].suggest_float("x", 0, 1)
            study.tell(elsewhere[0], 0.5)
        return ask(*args, **kwargs)

    monkeypatch.setattr(study, "ask", racing_ask)

    def objective(trial):
        ran.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    run_trials(study, objective, 2)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"] and ran == []
