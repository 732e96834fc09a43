"""Where the tuner's Optuna studies live, so several workers can share one study and survive a killed one.

Default: a journal file in the deltapass cache dir (no server needed; works for workers on
one machine or on a shared file system). A SQLAlchemy URL (sqlite, PostgreSQL, MySQL) gives
an RDBStorage for workers on many machines. Both record a heartbeat per running trial: a
worker that dies mid-trial leaves a RUNNING trial whose heartbeat stops, the next worker
marks it FAIL and re-queues its parameters (optuna's RetryHeartbeatStaleTrialCallback).
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from deltapass.cache import cache_dir

log = logging.getLogger("deltapass.search.storage")

# Tuning trials compile and time kernels for tens of seconds: a minute of silence means a dead worker.
DEFAULT_HEARTBEAT_INTERVAL = 20.0
DEFAULT_GRACE_PERIOD = 60.0
DEFAULT_MAX_RETRY = 3
HEARTBEAT_ATTR = "deltapass:heartbeat"


def default_storage_path() -> Path:
    return cache_dir() / "studies" / "journal.log"


def _retry_callback(max_retry: int | None) -> Callable[[optuna.Study, FrozenTrial], None]:
    """optuna's retry-on-stale callback (renamed in optuna 4.9; the old name is kept for older versions)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def open_storage(url: str | os.PathLike | None = None, *, heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 grace_period: float = DEFAULT_GRACE_PERIOD, max_retry: int | None = DEFAULT_MAX_RETRY) -> BaseStorage:
    """The study storage for `url`.

    None: the journal file default_storage_path(). A plain path or "journal:PATH": a journal
    file there. "sqlite:///...", "postgresql://..." or any SQLAlchemy URL: an RDBStorage.
    A trial whose heartbeat (every heartbeat_interval s) is older than grace_period s, or,
    for the journal, whose worker process on this machine is gone, is failed and retried
    up to max_retry times.
    """
    if not (heartbeat_interval > 0 and grace_period > 0):
        raise ValueError(f"heartbeat_interval and grace_period must be > 0, got heartbeat_interval="
                         f"{heartbeat_interval!r}, grace_period={grace_period!r}")
    callback = _retry_callback(max_retry)
    if url is None:
        return _journal(default_storage_path(), heartbeat_interval, grace_period, callback)
    text = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"storage must be a path, 'journal:PATH' or a SQLAlchemy URL, got storage={url!r}")
    if text.startswith("journal:"):
        path = text[len("journal:"):]
        path = path[2:] if path.startswith("//") else path            # journal:///abs/path
        if not path:
            raise ValueError(f"storage 'journal:PATH' needs a path, got storage={url!r}")
        return _journal(Path(path), heartbeat_interval, grace_period, callback)
    if "://" not in text:
        return _journal(Path(text), heartbeat_interval, grace_period, callback)
    return _rdb(text, heartbeat_interval, grace_period, callback)


def _journal(path: Path, heartbeat_interval: float, grace_period: float, callback) -> "HeartbeatJournalStorage":
    path = path.expanduser()
    if path.is_dir():
        raise ValueError(f"storage must name a journal file, got storage={str(path)!r} (a directory)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Both locks work across processes; symlinks are the default, Windows may not allow them.
    lock_cls = JournalFileOpenLock if sys.platform == "win32" else JournalFileSymlinkLock
    backend = JournalFileBackend(str(path), lock_obj=lock_cls(str(path)))
    log.debug("deltapass: journal study storage %s", path)
    return HeartbeatJournalStorage(backend, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                   stale_trial_callback=callback)


def _rdb(url: str, heartbeat_interval: float, grace_period: float, callback) -> RDBStorage:
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, ProgrammingError

    try:
        sqlalchemy.engine.make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ValueError(f"storage is not a journal path or a SQLAlchemy URL ({exc}), got storage={url!r}") from None
    params = inspect.signature(RDBStorage).parameters
    callback_arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
        else "failed_trial_callback"
    kwargs: dict[str, Any] = {
        "engine_kwargs": {"pool_pre_ping": True},          # long studies outlive idle connections
        "heartbeat_interval": max(1, math.ceil(heartbeat_interval)),   # RDBStorage takes whole seconds
        "grace_period": max(1, math.ceil(grace_period)),
        callback_arg: callback,
    }
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            # Workers starting together on an empty database race to create the tables; the loser retries.
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def load_or_create_study(name: str, storage: BaseStorage | str | os.PathLike | None, directions: Sequence[str],
                         sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """The study `name` in storage (created if missing), after failing and re-queuing stale trials."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got name={name!r}")
    if not isinstance(storage, BaseStorage):
        storage = open_storage(storage)
    directions = list(directions)
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler,
                                load_if_exists=True)
    wanted = [optuna.study.StudyDirection[d.upper()] for d in directions]
    if study.directions != wanted:
        raise ValueError(f"study {name!r} exists with directions {[d.name.lower() for d in study.directions]}, "
                         f"got directions={directions!r}")
    fail_stale_trials(study)
    return study


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail the RUNNING trials of dead workers now (optimize() also does so before each trial); how many."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    if failed:
        log.warning("deltapass: study %r: trial(s) %s of dead workers marked FAIL and re-queued",
                    study.study_name, failed)
    return len(failed)


# ---- heartbeats for the journal --------------------------------------------------------------------

def _machine_id() -> str | None:
    """Host + boot + pid namespace: two workers with equal ids see each other's pids (Linux only)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}|{boot}|{pid_ns}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else rest[18]


_MACHINE = _machine_id()


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A JournalStorage with optuna's heartbeat protocol, which JournalStorage lacks.

    The heartbeat is a trial system attr {time, trial, machine, pid, start}. A RUNNING trial is
    stale when its heartbeat is older than grace_period, or at once when it was written on this
    machine by a process that no longer exists. Trials without a heartbeat (asked outside
    optimize()) are never stale, as in RDBStorage.
    """

    def __init__(self, backend, *, heartbeat_interval: float, grace_period: float,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        beat = {"time": time.time(), "trial": trial_id, "machine": _MACHINE, "pid": os.getpid(),
                "start": _start_time(os.getpid())}
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, beat)
        except (UpdateFinishedTrialError, KeyError):
            pass   # another worker already judged this trial stale; its result will be refused at tell

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            # A retried trial inherits the failed one's attrs: only a beat for this trial counts.
            if not isinstance(beat, dict) or beat.get("trial") != trial._trial_id:
                continue
            if now - beat["time"] > self.grace_period or self._owner_is_gone(beat):
                stale.append(trial._trial_id)
        return stale

    @staticmethod
    def _owner_is_gone(beat: dict) -> bool:
        if _MACHINE is None or beat.get("machine") != _MACHINE:
            return False
        start = _start_time(beat["pid"])
        return start is None or (beat.get("start") is not None and start != beat["start"])

    def get_heartbeat_interval(self) -> float | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback

    def get_failed_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback   # the name optuna < 4.9 calls
