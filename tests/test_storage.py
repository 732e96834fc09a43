"""The tuner's study storage: workers in separate processes sharing one study, and resuming after a killed one."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from deltapass.search.storage import (HEARTBEAT_ATTR, HeartbeatJournalStorage, check_storage, default_storage_path,
                                      fail_stale_trials, load_or_create_study, open_storage)
from pg_server import postgres_url  # noqa: F401  (the fixture)

HEARTBEAT, GRACE = 0.5, 2      # seconds; the RDB storage rounds up to whole seconds

# A worker: optimizes a cheap deterministic objective on the shared study. With a marker path it
# hangs in its first trial (after writing the marker), to be killed there.
WORKER = r"""
import os, sys, time
from pathlib import Path
import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from deltapass.search.storage import load_or_create_study, open_storage

url, name, mode, count, marker = sys.argv[1:6]
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = open_storage(url, heartbeat_interval=float(sys.argv[6]), grace_period=float(sys.argv[7]), max_retry=2)
study = load_or_create_study(name, storage, ["minimize"], sampler=optuna.samplers.RandomSampler(seed=os.getpid()))

def objective(trial):
    x = trial.suggest_int("x", 0, 10_000)
    trial.set_user_attr("pid", os.getpid())
    if marker != "-":
        Path(marker).write_text(str(trial.number))
        time.sleep(3600)
    time.sleep(0.05)
    return float((x - 4321) ** 2)

if mode == "n_trials":
    study.optimize(objective, n_trials=int(count))
else:  # until the study holds `count` COMPLETE trials, whoever ran them
    study.optimize(objective, callbacks=[MaxTrialsCallback(int(count), states=(TrialState.COMPLETE,))])
"""


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path) -> str:
    if request.param == "journal":
        (tmp_path / "studies").mkdir()
        return f"journal:{tmp_path / 'studies' / 'journal.log'}"
    return request.getfixturevalue("postgres_url")


def _worker(tmp_path: Path, url: str, name: str, mode: str, count: int, marker: Path | None = None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [sys.executable, str(script), url, name, mode, str(count), str(marker or "-"), str(HEARTBEAT), str(GRACE)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=HEARTBEAT,
                                                                      grace_period=GRACE))


def test_two_workers_share_one_study(tmp_path, storage_url):
    open_storage(storage_url)                    # the tables / journal exist before the workers race
    workers = [_worker(tmp_path, storage_url, "shared", "n_trials", 10) for _ in range(2)]
    for proc in workers:
        _finish(proc)
    trials = _study(storage_url, "shared").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 20
    assert sorted(t.number for t in trials) == list(range(20))
    pids = [t.user_attrs["pid"] for t in trials]
    assert set(pids) == {p.pid for p in workers} and all(pids.count(p.pid) == 10 for p in workers)
    assert all(t.value == (t.params["x"] - 4321) ** 2 for t in trials)


def test_a_killed_workers_trial_is_failed_and_retried(tmp_path, storage_url):
    marker = tmp_path / "hanging"
    hung = _worker(tmp_path, storage_url, "resume", "until", 5, marker)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert hung.poll() is None and time.monotonic() < deadline, hung.stdout.read() if hung.poll() else "timeout"
        time.sleep(0.05)
    time.sleep(2 * HEARTBEAT)                    # its heartbeat thread has beaten at least once
    [running] = _study(storage_url, "resume").get_trials(states=(TrialState.RUNNING,))
    assert running.number == int(marker.read_text()) and running.user_attrs["pid"] == hung.pid
    hung.send_signal(signal.SIGKILL)
    hung.wait()
    if "postgresql" in storage_url:
        time.sleep(GRACE + 1)                    # its heartbeat goes stale (the journal also sees the dead pid)
    _finish(_worker(tmp_path, storage_url, "resume", "until", 5))

    trials = _study(storage_url, "resume").get_trials()
    failed = trials[running.number]
    assert failed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == failed.params and retries[0].user_attrs["pid"] != hung.pid
    assert retries[0].system_attrs["retry_history"] == [failed.number]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_journal_heartbeat_staleness(tmp_path):
    storage = open_storage(tmp_path / "j.log", heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    assert isinstance(storage, HeartbeatJournalStorage)
    study = load_or_create_study("beats", storage, ["minimize"])
    trial = study.ask()
    tid = trial._trial_id
    sid = study._study_id
    assert storage._get_stale_trial_ids(sid) == []                    # no heartbeat yet: never stale
    storage.record_heartbeat(tid)
    assert storage._get_stale_trial_ids(sid) == []                    # fresh, and this process lives
    beat = storage.get_trial(tid).system_attrs[HEARTBEAT_ATTR]
    storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, {**beat, "machine": "elsewhere", "time": time.time() - 1})
    assert storage._get_stale_trial_ids(sid) == []                    # another machine, within grace
    storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, {**beat, "machine": "elsewhere", "time": time.time() - 10})
    assert storage._get_stale_trial_ids(sid) == [tid]                 # another machine, silent too long
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, {**beat, "pid": dead.pid})
    assert storage._get_stale_trial_ids(sid) == [tid]                 # this machine, process gone
    storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, {**beat, "trial": tid + 1})
    assert storage._get_stale_trial_ids(sid) == []                    # a beat inherited from another trial
    storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, {**beat, "pid": dead.pid})
    assert fail_stale_trials(study) == 1
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[1].state == TrialState.WAITING
    assert trials[1].system_attrs["failed_trial"] == 0


def test_open_storage_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    assert default_storage_path() == tmp_path / "cache" / "studies" / "journal.log"
    assert isinstance(open_storage(None), HeartbeatJournalStorage)
    assert default_storage_path().is_file()
    (tmp_path / "a").mkdir()
    assert isinstance(open_storage(f"journal:{tmp_path / 'a' / 'x.log'}"), HeartbeatJournalStorage)
    assert (tmp_path / "a" / "x.log").is_file()
    assert isinstance(open_storage(str(tmp_path / "b.log")), HeartbeatJournalStorage)
    rdb = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=0.5, grace_period=2)
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert rdb.get_heartbeat_interval() == 1 and rdb.grace_period == 2
    for bad in ("", "journal:", "nosuchdialect://host/db", "http//x://", str(tmp_path)):
        with pytest.raises(ValueError, match=r"storage="):
            open_storage(bad)


def test_load_or_create_study_checks_directions(tmp_path):
    storage = open_storage(tmp_path / "j.log")
    study = load_or_create_study("s", storage, ["minimize", "maximize"])
    again = load_or_create_study("s", storage, ["minimize", "maximize"])
    assert again._study_id == study._study_id
    with pytest.raises(ValueError, match=r"directions=\['minimize'\]"):
        load_or_create_study("s", storage, ["minimize"])
    with pytest.raises(ValueError, match=r"name=''"):
        load_or_create_study("", storage, ["minimize"])


def test_unreachable_storage_is_a_value_error_naming_it(tmp_path, postgres_url):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    dead_port = postgres_url.rsplit(":", 1)[0] + ":1/deltapass_test"
    cases = {
        "sqlite:////nonexistent/x.db": "unable to open database file",
        str(a_file / "x.db"): "is not a writable folder",              # a journal under a file
        f"journal:{a_file / 'sub' / 'x.log'}": "does not exist",
        dead_port: "OperationalError",                                     # no server listens there
    }
    for url, cause in cases.items():
        for call in (open_storage, check_storage):
            with pytest.raises(ValueError, match=rf"storage={re.escape(repr(url))}.*{cause}"):
                call(url)
    assert not Path("/nonexistent").exists()
    with_password = dead_port.replace("postgres@", "postgres:hunter2@")
    with pytest.raises(ValueError, match=r"storage='postgresql://postgres:\*\*\*@127.0.0.1:1/") as caught:
        check_storage(with_password)
    assert "hunter2" not in str(caught.value)


def test_check_storage_accepts_and_creates_nothing(tmp_path, postgres_url, monkeypatch):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    assert check_storage(None) is None and not (tmp_path / "cache").exists()
    journal = tmp_path / "journal.log"
    assert check_storage(f"journal:{journal}") is None
    assert not journal.exists()                                           # a check, not an open
    assert check_storage(f"sqlite:///{tmp_path / 's.db'}") is None
    assert check_storage(postgres_url) is None
    with pytest.raises(ValueError, match=r"storage=''"):
        check_storage("")


def test_a_journal_in_a_missing_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    """A typo in --storage must not create folders (the default journal's folder in the cache dir is created)."""
    missing = tmp_path / "no_such_dir" / "journal.log"
    for url in (str(missing), f"journal:{missing}"):
        for call in (open_storage, check_storage):
            with pytest.raises(ValueError, match=rf"storage={re.escape(repr(url))}.*folder "
                                                 rf"{re.escape(repr(str(missing.parent)))} does not exist"):
                call(url)
    assert not missing.parent.exists()
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    open_storage(None)
    assert default_storage_path().is_file()


def test_a_bare_postgresql_url_uses_the_installed_driver(monkeypatch):
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; without it the search extra's psycopg2 serves."""
    import importlib.util

    import sqlalchemy

    from deltapass.search.storage import _with_installed_driver

    url = sqlalchemy.engine.make_url("postgresql://u:pw@h:5/db")
    installed = {"psycopg2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    assert _with_installed_driver(url).drivername == "postgresql+psycopg2"
    assert _with_installed_driver(url).render_as_string(hide_password=False) == "postgresql+psycopg2://u:pw@h:5/db"
    installed.add("psycopg")
    assert _with_installed_driver(url) is url
    for named in ("postgresql+psycopg://h/db", "postgresql+psycopg2://h/db", "sqlite:///x.db"):
        assert _with_installed_driver(sqlalchemy.engine.make_url(named)) == sqlalchemy.engine.make_url(named)
