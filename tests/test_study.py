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
