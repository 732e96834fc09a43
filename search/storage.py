"""Where the tuner's Optuna studies live, so several workers can share one study and survive a killed one.

Default: a journal file in the deltapass cache dir (no server needed; works for workers on
one machine or on a shared file system). A SQLAlchemy URL (sqlite, PostgreSQL, MySQL) gives
an RDBStorage for workers on many machines. Both record a heartbeat per running trial: a
worker that dies mid-trial leaves a RUNNING trial whose heartbeat stops, the next worker
marks it FAIL and re-queues its parameters (optuna's RetryHeartbeatStaleTrialCallback).
A journal whose last line a killed writer left torn, or whose tail a power loss left NUL, is repaired on open
and before each append.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
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

    None: the journal file default_storage_path() (its folder is created). A plain path or
    "journal:PATH": a journal file there, in a folder that must exist. "sqlite:///...",
    "postgresql://..." (psycopg 3 if installed, else psycopg2) or any SQLAlchemy URL: an RDBStorage.
    A trial whose heartbeat (every heartbeat_interval s) is older than grace_period s, or,
    for the journal, whose worker process on this machine is gone, is failed and retried
    up to max_retry times. A journal whose last line was torn by a killed writer is repaired
    (see repair_torn_journal). Any storage that cannot be opened raises ValueError naming it.
    """
    if not (heartbeat_interval > 0 and grace_period > 0):
        raise ValueError(f"heartbeat_interval and grace_period must be > 0, got heartbeat_interval="
                         f"{heartbeat_interval!r}, grace_period={grace_period!r}")
    callback = _retry_callback(max_retry)
    kind, where, shown = _parse_storage(url)
    if kind == "journal":
        return _journal(where, shown, url is None, heartbeat_interval, grace_period, callback)
    return _rdb(where, heartbeat_interval, grace_period, callback)


def check_storage(url: str | os.PathLike | None = None) -> None:
    """Raise the ValueError open_storage(url) would raise for a malformed, unreachable or unwritable storage.

    Cheap enough to call before loading a model: for a journal it checks, without creating
    anything, that the file (or the nearest existing folder above it) is writable; a database
    is opened (its tables are created if missing) and closed again.
    """
    kind, where, shown = _parse_storage(url)
    if kind == "journal":
        _check_journal_writable(where, shown, url is None)
        return
    storage = _rdb(where, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_GRACE_PERIOD, None)
    storage.engine.dispose()


def _parse_storage(url: str | os.PathLike | None) -> tuple[str, Any, str]:
    """("journal", Path) or ("rdb", SQLAlchemy URL) for open_storage's `url`, and `url` as errors show it."""
    if url is None:
        return "journal", default_storage_path(), str(default_storage_path())
    text = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"storage must be a path, 'journal:PATH' or a SQLAlchemy URL, got storage={url!r}")
    if text.startswith("journal:"):
        path = text[len("journal:"):]
        path = path[2:] if path.startswith("//") else path            # journal:///abs/path
        if not path:
            raise ValueError(f"storage 'journal:PATH' needs a path, got storage={url!r}")
        return "journal", Path(path).expanduser(), text
    if "://" not in text:
        return "journal", Path(text).expanduser(), text
    return "rdb", text, text


def _check_journal_writable(path: Path, shown: str, default: bool) -> None:
    """The journal's folder must exist (a typo must not make folders), except the cache dir's own (`default`)."""
    if path.is_dir():
        raise ValueError(f"storage must name a journal file, got storage={shown!r} (a directory)")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"cannot open storage={shown!r}: the journal file {str(path)!r} is not readable and "
                         f"writable")
    folder = path.parent
    if not default and not folder.exists():
        raise ValueError(f"cannot open storage={shown!r}: the folder {str(folder)!r} does not exist "
                         f"(create it first)")
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    # The journal's lock file is created next to it, so its folder must be writable too.
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot open storage={shown!r}: {str(folder)!r} is not a writable folder")


def _journal(path: Path, shown: str, default: bool, heartbeat_interval: float, grace_period: float,
             callback) -> "HeartbeatJournalStorage":
    _check_journal_writable(path, shown, default)
    try:
        if default:
            path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_journal(path)
        backend = _TailRepairingBackend(str(path), lock_obj=_journal_lock(path))
    except OSError as exc:
        raise ValueError(f"cannot open storage={shown!r}: {exc}") from exc
    log.debug("journal study storage %s", path)
    try:
        return HeartbeatJournalStorage(backend, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                       stale_trial_callback=callback)
    except ValueError as exc:     # json.JSONDecodeError included: damage before the last line
        raise ValueError(f"cannot read storage={shown!r}: the journal is damaged before its last line "
                         f"({type(exc).__name__}: {exc}); it needs repair by hand") from exc


def _rdb(url: str, heartbeat_interval: float, grace_period: float, callback) -> RDBStorage:
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, ProgrammingError, SQLAlchemyError

    try:
        parsed = _with_installed_driver(sqlalchemy.engine.make_url(url))
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ValueError(f"storage is not a journal path or a SQLAlchemy URL ({exc}), got storage={url!r}") from None
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)   # errors end up in logs
    url = parsed.render_as_string(hide_password=False)
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
        except (IntegrityError, ProgrammingError) as exc:
            # Workers starting together on an empty database race to create the tables; the loser retries.
            if attempt == 2:
                raise ValueError(f"cannot open storage={shown!r}: {_cause(exc)}") from exc
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, OSError) as exc:
            raise ValueError(f"cannot open storage={shown!r}: {_cause(exc)}") from exc
    raise AssertionError("unreachable")


def _with_installed_driver(url):
    """A bare postgresql:// URL with the driver that is installed.

    SQLAlchemy 2.1 reads postgresql:// as psycopg (3); the search extra installs psycopg2-binary.
    So psycopg 3 is used when importable, else psycopg2. A URL naming its driver is kept.
    """
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return url.set(drivername="postgresql+psycopg2")
    return url


def _cause(exc: BaseException) -> str:
    """The driver's own message (SQLAlchemy wraps it with the SQL and a help link)."""
    orig = getattr(exc, "orig", None)
    return f"{type(exc).__name__}: {str(orig or exc).strip()}"


def _journal_lock(path: Path) -> JournalFileOpenLock | JournalFileSymlinkLock:
    # Both locks work across processes; symlinks are the default, Windows may not allow them.
    lock_cls = JournalFileOpenLock if sys.platform == "win32" else JournalFileSymlinkLock
    return lock_cls(str(path))


# ---- repairing a torn journal ----------------------------------------------------------------------

def repair_torn_journal(path: str | os.PathLike) -> Path | None:
    """Cut a torn tail off the journal at `path`; the backup's path, or None if nothing was cut.

    A writer killed mid-append (or a full disk) can leave the last line incomplete: no trailing
    newline, or not a JSON record; a power loss can leave NUL bytes where the last records were.
    optuna's reader skips an unterminated last line but fails on NUL bytes, and the next append
    lands on a torn line, after which every load fails. So before this process appends anything,
    the file is copied to PATH.torn-<UTC time> and truncated to the end of its last complete
    record, with one warning saying what was cut. Only the last line (or the NUL run) is cut;
    damage further up is left for the load to report. open_storage's journals call it on open and
    before each append.
    """
    path = Path(path)
    if not _journal_tail_is_clean(path):
        # Checked again under the journal's own lock, the one JournalFileBackend takes for every
        # append: while it is held no live worker is mid-write, so an unfinished last line really
        # is torn (not being written), and two workers opening at once cut it only once. An fcntl
        # lock would exclude neither: optuna's writers do not take it.
        lock = _journal_lock(path)
        lock.acquire()
        try:
            return _cut_torn_tail(path)
        finally:
            lock.release()
    return None


class _TailRepairingBackend(JournalFileBackend):
    """optuna's journal file, which also cuts a torn last line before each append of this process.

    The repair on open does not help a worker that is already running when another dies
    mid-append: its next append would land on the torn line. optuna's append takes the lock
    itself (and the lock is not reentrant), so the cut takes it just before; another writer
    dying in between is the only gap.
    """

    def __init__(self, file_path: str, lock_obj: JournalFileOpenLock | JournalFileSymlinkLock) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        self.journal_path = Path(file_path)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        repair_torn_journal(self.journal_path)
        super().append_logs(logs)


def _line_start(f, end: int) -> int:
    """The offset just after the last newline before `end` (0 if there is none)."""
    pos, step = end, 4096          # most records are short: read backwards in growing steps
    while pos > 0:
        step = min(step * 2, pos, 1 << 20)
        f.seek(pos - step)
        found = f.read(step).rfind(b"\n")
        if found >= 0:
            return pos - step + found + 1
        pos -= step
    return 0


def _is_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _read(f, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


# Every line optuna's journal writes starts so; a whole file that does not is no torn journal.
_RECORD_HEAD = b'{"op_code":'


def _all_nul(f, start: int, end: int) -> bool:
    f.seek(start)
    while start < end:
        chunk = f.read(min(end - start, 1 << 20))
        if not chunk or chunk.count(0) != len(chunk):
            return False
        start += len(chunk)
    return True


def _damaged_tail(f, size: int) -> tuple[int, str] | None:
    """Where the journal's complete records end and what follows them; None if intact or not just the tail is bad.

    The tail is the last line when it is unterminated (a writer killed mid-append) or terminated but
    not a record, and NUL bytes (a power loss: the file grew, its data never reached the disk). It is
    cut only after a complete record, or when it is the whole file and starts like a record or is all
    NUL: anything else is not a journal, or damaged further up, and left for the load to report.
    """
    if size == 0:
        return None
    terminated = _read(f, size - 1, size) == b"\n"
    end = _line_start(f, size - 1 if terminated else size)
    if terminated and _is_record(_read(f, end, size)):
        return None
    nul = _all_nul(f, end, size)
    if end > 0:
        if not _is_record(_read(f, _line_start(f, end - 1), end)):
            return None
    elif not (nul or _RECORD_HEAD.startswith(_read(f, 0, len(_RECORD_HEAD)))):
        return None
    cut = size - end
    if nul:
        found = f"{cut} NUL bytes (what a power loss or a crash of the machine leaves)"
    elif terminated:
        found = f"a last line of {cut} bytes that is not a journal record"
    else:
        found = f"an unterminated last line of {cut} bytes (left by a writer that died mid-append)"
    return end, found


def _journal_tail_is_clean(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return _damaged_tail(f, os.fstat(f.fileno()).st_size) is None
    except FileNotFoundError:
        return True


def _cut_torn_tail(path: Path) -> Path | None:
    with open(path, "r+b") as f:
        damage = _damaged_tail(f, os.fstat(f.fileno()).st_size)
        if damage is None:
            return None
        end, found = damage
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        backup = path.with_name(f"{path.name}.torn-{stamp}")
        f.seek(0)
        with open(backup, "xb") as copy:
            shutil.copyfileobj(f, copy)
            copy.flush()
            os.fsync(copy.fileno())
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    log.warning("journal %s ended in %s after byte %d; cut it off, the original is kept at %s",
                path, found, end, backup)
    return backup


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
        log.warning("study %r: trial(s) %s of dead workers marked FAIL and re-queued",
                    study.study_name, failed)
    return len(failed)


# ---- heartbeats for the journal --------------------------------------------------------------------

# The one private optuna name deltapass uses. optuna runs the heartbeat protocol (Study.optimize
# starts a thread calling record_heartbeat, optuna.storages.fail_stale_trials asks for
# _get_stale_trial_ids) only for a storage that is an instance of this class, and no public
# module exports it: checked in optuna 4.0.0, 4.5.0, 4.8.0, 4.9.0, 5.0.0 (pyproject allows >= 4)
# and the main branch of 2026-11, whose docstring still says "not supposed to be directly accessed".
# Its abstract methods changed once: 4.9 renamed get_failed_trial_callback to
# get_heartbeat_stale_trial_callback; HeartbeatJournalStorage implements both.
try:
    from optuna.storages._heartbeat import BaseHeartbeat as _OptunaHeartbeatProtocol
except ImportError as exc:      # a future optuna moved it: say so instead of failing somewhere obscure
    raise ImportError(f"deltapass's journal heartbeats need optuna.storages._heartbeat.BaseHeartbeat, which "
                      f"optuna {optuna.__version__} does not have") from exc


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


class HeartbeatJournalStorage(JournalStorage, _OptunaHeartbeatProtocol):
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
