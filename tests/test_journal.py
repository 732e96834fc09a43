"""The journal study storage survives a writer killed mid-append: a torn last line is cut off on open."""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from deltapass.search.storage import load_or_create_study, open_storage

CREATE_TRIAL = 4   # optuna's JournalOperation.CREATE_TRIAL


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_int("x", -1000, 1000)
    y = trial.suggest_float("y", 0.0, 1.0)
    trial.set_user_attr("note", f"x={x}")
    return x * x + y


def _complete_study(path: Path, trials: int) -> list[optuna.trial.FrozenTrial]:
    study = load_or_create_study("torn", open_storage(path), ["minimize"],
                                 sampler=optuna.samplers.RandomSampler(seed=random.randrange(1 << 30)))
    study.optimize(_objective, n_trials=trials)
    return study.get_trials()


def _load(path: Path) -> optuna.Study:
    return optuna.load_study(study_name="torn", storage=open_storage(path))


def _summary(trials) -> list[tuple]:
    return [(t.number, t.state, t.params, t.values, t.user_attrs) for t in trials]


def _torn_tails(intact: bytes) -> dict[str, tuple[bytes, str]]:
    """What a writer killed at different points of an append, or a power loss, leaves after the intact journal;
    and what the warning must say it found."""
    create = next(line for line in intact.splitlines() if json.loads(line)["op_code"] == CREATE_TRIAL)
    unterminated = "unterminated last line"
    return {
        "partial JSON": (b'{"op_code": 4, "datetime_st', unterminated),
        "long partial JSON": (b'{"op_code":8,"worker_id":"w","trial_id":0,"user_attr":{"k":"' + b"x" * 50_000,
                              unterminated),
        # The whole record but not its newline: no reader ever saw it, so it must not come back
        # (here it would be an extra trial).
        "complete JSON, no newline": (create, unterminated),
        "terminated non-record": (b'{"op_code":6,"trial_id":1,"sta\n', "not a journal record"),
        "terminated garbage": (b"\xff\xfe#garbage\n", "not a journal record"),
        # A power loss: the file grew, its last blocks never reached the disk.
        "NUL tail": (b"\0" * 4096, "4096 NUL bytes"),
        "record then NULs": (b'{"op_code":4,"datetime_start":"2026' + b"\0" * 3000, unterminated),
    }


@pytest.mark.parametrize("tear", ["partial JSON", "long partial JSON", "complete JSON, no newline",
                                  "terminated non-record", "terminated garbage", "NUL tail", "record then NULs"])
def test_a_torn_last_line_is_cut_and_the_study_resumes(tmp_path, caplog, tear):
    path = tmp_path / "studies" / "journal.log"
    path.parent.mkdir()
    trials = random.randint(2, 4)
    before = _complete_study(path, trials)
    intact = path.read_bytes()
    tail, found = _torn_tails(intact)[tear]
    torn = intact + tail
    path.write_bytes(torn)

    with caplog.at_level(logging.WARNING, logger="deltapass.search.storage"):
        study = _load(path)
    assert _summary(study.get_trials()) == _summary(before)          # no complete trial lost, none invented
    assert path.read_bytes() == intact
    [backup] = tmp_path.glob("studies/journal.log.torn-*")
    assert backup.read_bytes() == torn
    [record] = [r for r in caplog.records if r.name.startswith("deltapass")]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(path) in message and str(backup) in message and found in message, message
    assert f"after byte {len(intact)}" in message, message

    study.optimize(_objective, n_trials=2)                            # appends after the cut
    again = _load(path).get_trials()                                  # a second open reads it all back
    assert _summary(again[:trials]) == _summary(before)
    assert len(again) == trials + 2 and all(t.state == TrialState.COMPLETE for t in again)
    assert list(tmp_path.glob("studies/journal.log.torn-*")) == [backup]


def test_an_intact_journal_is_not_touched(tmp_path, caplog):
    path = tmp_path / "journal.log"
    _complete_study(path, 2)
    intact = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="deltapass.search.storage"):
        assert len(_load(path).get_trials()) == 2
    assert path.read_bytes() == intact and not [r for r in caplog.records if r.name.startswith("deltapass")]
    assert not list(tmp_path.glob("*.torn-*"))


def test_the_cut_waits_for_the_journals_lock(tmp_path):
    """A worker mid-append holds the lock: an opener must not take its unfinished line for a torn one."""
    path = tmp_path / "journal.log"
    before = _complete_study(path, 2)
    intact = path.read_bytes()
    head, rest = b'{"op_code":2,"worker_id":"w",', b'"study_id":0,"user_attr":{"writer":"alive"}}\n'
    path.write_bytes(intact + head)
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    opened: list[optuna.Study] = []
    opener = threading.Thread(target=lambda: opened.append(_load(path)))
    try:
        opener.start()
        time.sleep(0.5)
        assert opener.is_alive() and not opened
        assert path.read_bytes().startswith(intact) and not list(tmp_path.glob("*.torn-*"))
        with path.open("ab") as f:                                    # the writer finishes its record
            f.write(rest)
    finally:
        lock.release()
    opener.join(timeout=30)
    assert _summary(opened[0].get_trials()) == _summary(before)
    assert opened[0].user_attrs == {"writer": "alive"}
    assert not list(tmp_path.glob("*.torn-*"))                        # a finished line is not cut


def test_a_file_that_is_no_journal_is_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\nsecond line without newline")
    with pytest.raises(ValueError, match=r"cannot read storage=.*notes\.txt.* damaged before its last line"):
        open_storage(path)
    assert path.read_bytes() == b"first line\nsecond line without newline"
    assert not list(tmp_path.glob("*.torn-*"))


def test_damage_above_the_last_line_is_reported_not_cut(tmp_path):
    path = tmp_path / "journal.log"
    _complete_study(path, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    broken = b"".join(lines[:2]) + b'{"op_code":4,"datetime_st' + b"".join(lines[2:])
    path.write_bytes(broken)
    with pytest.raises(ValueError, match=r"cannot read storage=.*journal\.log.* damaged before its last line"):
        open_storage(path)
    assert path.read_bytes() == broken


def test_a_running_worker_does_not_append_onto_a_torn_line(tmp_path, caplog):
    """Another worker dies mid-append while this one runs: its next append cuts the torn line first."""
    path = tmp_path / "journal.log"
    storage = open_storage(path)
    study = load_or_create_study("torn", storage, ["minimize"])
    study.optimize(_objective, n_trials=2)
    before = study.get_trials()
    intact = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"dead","trial_id":0,"param_na')
    with caplog.at_level(logging.WARNING, logger="deltapass.search.storage"):
        study.optimize(_objective, n_trials=3)
    [backup] = tmp_path.glob("journal.log.torn-*")
    assert backup.read_bytes().startswith(intact) and backup.read_bytes() != intact
    again = _load(path).get_trials()
    assert _summary(again[:2]) == _summary(before)
    assert len(again) == 5 and all(t.state == TrialState.COMPLETE for t in again)


def test_a_journal_that_is_only_nul_bytes_is_emptied(tmp_path, caplog):
    """A power loss right after the journal was created: nothing but NULs, cut to an empty journal."""
    path = tmp_path / "journal.log"
    path.write_bytes(b"\0" * 8192)
    with caplog.at_level(logging.WARNING, logger="deltapass.search.storage"):
        study = load_or_create_study("torn", open_storage(path), ["minimize"])
    study.optimize(_objective, n_trials=2)
    assert len(_load(path).get_trials()) == 2
    [backup] = tmp_path.glob("journal.log.torn-*")
    assert backup.read_bytes() == b"\0" * 8192
    [record] = [r for r in caplog.records if r.name.startswith("deltapass")]
    assert "8192 NUL bytes" in record.getMessage()
