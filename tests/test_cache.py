"""The per-GPU cache of tuned configs, and the backend reading it when the user gave no config."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltapass
from deltapass import DeltaConfig, SiteConfig
from deltapass.cache import (SCHEMA_VERSION, STALE_TEMP_SECONDS, CacheEntry, HardwareKey, TunedConfigCache, cache_dir,
                             length_bucket)
from deltapass.fingerprint import model_fingerprint

TUNED = DeltaConfig(default=SiteConfig(sink=16, window=32, gamma=16, correction="none"))
FP = model_fingerprint([("layers.0", 4, 2, 64)])


def cpu() -> HardwareKey:
    return HardwareKey.current("cpu")


def entry(bucket=4096, config=TUNED, hardware=None, fingerprint=FP, **meta) -> CacheEntry:
    return CacheEntry(hardware=hardware or cpu(), fingerprint=fingerprint, bucket=bucket, config=config,
                      meta={"study": "t", **meta})


# ---- where the cache lives ------------------------------------------------------------------------

def test_cache_dir_env_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DELTAPASS_CACHE_DIR")
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "deltapass"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert cache_dir() == tmp_path / "home" / ".cache" / "deltapass"
    # A TunedConfigCache without a root follows the environment at each use.
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "later"))
    assert TunedConfigCache().root == tmp_path / "later"


# ---- keys ------------------------------------------------------------------------------------------

def test_length_bucket():
    assert [length_bucket(n) for n in (0, 1, 1024, 1025, 4096, 4097, 100_000)] == \
        [1024, 1024, 1024, 2048, 4096, 8192, 131072]
    with pytest.raises(ValueError, match=r"n=-1"):
        length_bucket(-1)


def test_fingerprint_and_signature_are_canonical():
    sig = [("model.layers.0.self_attn", 32, 8, 128), ("model.layers.1.self_attn", 32, 8, 128)]
    assert model_fingerprint(sig) == model_fingerprint([list(s) for s in sig])
    assert re.fullmatch(r"[0-9a-f]{16}", model_fingerprint(sig))
    assert model_fingerprint(sig) != model_fingerprint(sig[::-1])
    assert model_fingerprint(sig, "weights-a") != model_fingerprint(sig, "weights-b")
    assert model_fingerprint(sig) != model_fingerprint([(n, q, 4, d) for n, q, _, d in sig])


def test_hardware_key_on_cpu():
    key = cpu()
    assert key.capability == "cpu" and key.torch_version == torch.__version__
    assert key.device_name and key == HardwareKey.current(torch.device("cpu"))
    assert torch.__version__ not in key.slug            # versions are checked as staleness, not in the name
    assert all(c.isalnum() or c in "-." for c in key.slug)


# ---- save and lookup -------------------------------------------------------------------------------

def test_save_is_atomic_and_round_trips(tmp_path, monkeypatch):
    cache = TunedConfigCache(tmp_path)
    e = entry()
    path = cache.save(e)
    assert path.parent == tmp_path / "configs" and path.name == e.file_name
    assert [p.name for p in path.parent.iterdir()] == [path.name]        # no temp file left
    found = cache.lookup(cpu(), FP, 3000)
    assert found == e and found.config == TUNED
    assert CacheEntry.from_json(path.read_text()) == e

    # A writer dying before the rename leaves the old file whole and no temp file behind.
    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        cache.save(replace(e, config=DeltaConfig()))
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert cache.lookup(cpu(), FP, 3000).config == TUNED


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask 022", "umask 002", "umask 077"])
def test_saved_entries_honour_the_umask(tmp_path, umask, mode):
    """Entries were 0o600 whatever the umask, so other users of a shared cache could not read them."""
    old = os.umask(umask)
    try:
        path = TunedConfigCache(tmp_path).save(entry())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_a_save_removes_stale_temp_files_and_keeps_live_ones(tmp_path, caplog):
    """A save killed before its rename left a hidden .tmp file behind for good; the next save removes those
    whose writer on this host is gone, or that are older than STALE_TEMP_SECONDS, and no other."""
    cache = TunedConfigCache(tmp_path)
    cache.config_dir.mkdir(parents=True)
    host = re.sub(r"[^a-z0-9.]+", "-", socket.gethostname().lower()).strip("-")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    old = time.time() - STALE_TEMP_SECONDS - 60

    def plant(name: str, mtime: float | None = None) -> Path:
        path = cache.config_dir / name
        path.write_text("{")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    removed = [plant(f".{host}-{dead_pid}-0123abcd.tmp"),              # this host's writer is gone
               plant(f".{host}-{os.getpid()}-0123abcd.tmp", old),      # alive, but no save takes this long
               plant(".k3j_x8q1.tmp", old),                            # an older deltapass's mkstemp name, old
               plant(f".other-host-{dead_pid}-0123abcd.tmp", old)]     # another host's, old
    kept = [plant(f".{host}-{os.getpid()}-4567cdef.tmp"),              # a live writer's (this process)
            plant(f".other-host-{dead_pid}-4567cdef.tmp"),             # another host's pid says nothing here
            plant(".k3j_x8q1x.tmp"),                                   # unknown writer, recent
            plant(".keep", old)]                                       # not a temporary file
    with caplog.at_level(logging.INFO, logger="deltapass.cache"):
        saved = cache.save(entry())
    left = sorted(p.name for p in cache.config_dir.iterdir())
    assert left == sorted([saved.name] + [p.name for p in kept])
    assert {str(p) for p in removed} == {r.args[0] for r in caplog.records
                                         if r.getMessage().startswith("removed the stale temporary file")}


def test_lookup_serves_only_the_tuned_bucket_and_names_the_nearest(tmp_path):
    cache = TunedConfigCache(tmp_path)
    for bucket in (1024, 4096, 16384):
        cache.save(entry(bucket, config=DeltaConfig(default=SiteConfig(window=bucket))))

    def bucket_for(n):
        found = cache.lookup(cpu(), FP, n)
        return found and found.bucket

    assert bucket_for(4096) == 4096 and bucket_for(3000) == 4096 and bucket_for(2049) == 4096
    assert bucket_for(10) == 1024 and bucket_for(16000) == 16384
    assert bucket_for(2048) is None and bucket_for(5000) is None and bucket_for(1_000_000) is None
    assert cache.buckets(cpu(), FP) == [1024, 4096, 16384]
    reason = cache.resolve(cpu(), FP, 6000).reason
    assert "bucket 8192" in reason and "nearest tuned bucket is 4096" in reason
    assert "deltapass tune --length 6000" in reason
    assert cache.lookup(cpu(), FP, 4096).config.default.window == 4096
    assert cache.lookup(cpu(), model_fingerprint([("other", 1, 1, 64)]), 4096) is None
    other_gpu = HardwareKey("NVIDIA H200", "9.0", torch.__version__, cpu().triton_version)
    assert cache.lookup(other_gpu, FP, 4096) is None
    only_big = TunedConfigCache(tmp_path / "big")
    only_big.save(entry(16384))
    assert only_big.lookup(cpu(), FP, 4096) is None


def test_read_only_cache_dir_is_reported_before_tuning(tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"            # root writes anywhere: a file where the dir should be
        blocked.write_text("")
        cache = TunedConfigCache(blocked)
    else:
        tmp_path.chmod(0o500)
        cache = TunedConfigCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="is not writable"):
        cache.check_writable()
    TunedConfigCache(tmp_path.parent / (tmp_path.name + "-ok")).check_writable()


def test_lookup_on_missing_dir_is_none(tmp_path):
    cache = TunedConfigCache(tmp_path / "nowhere")
    assert cache.lookup(cpu(), FP, 4096) is None and cache.entries() == []


def _write(cache: TunedConfigCache, bucket: int, text: str, hardware=None):
    path = cache.config_dir / CacheEntry.name_for(hardware or cpu(), FP, bucket)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_entries():
    good = entry(4096).to_dict()
    invalid = json.loads(json.dumps(good))
    invalid["config"]["default"]["window"] = -5
    huge = json.loads(json.dumps(good))
    huge["config"]["default"]["sink"] = 2**70          # valid JSON, no int32 in the kernels can hold it
    unknown = json.loads(json.dumps(good))
    unknown["config"]["default"]["correction"] = "bogus"
    missing = {k: v for k, v in good.items() if k != "hardware"}
    old_torch = json.loads(json.dumps(good))
    old_torch["hardware"]["torch_version"] = "1.13.0"
    old_triton = json.loads(json.dumps(good))
    old_triton["hardware"]["triton_version"] = "2.0.0"
    old_kernels = json.loads(json.dumps(good))
    old_kernels["hardware"]["kernels"] = "1"
    unrecorded_kernels = json.loads(json.dumps(good))
    del unrecorded_kernels["hardware"]["kernels"]
    schema = {**good, "schema": SCHEMA_VERSION + 1}
    return {
        "bad json": ("{not json", "corrupt: bad JSON"),
        "invalid window": (json.dumps(invalid), "window must be >= 0"),
        "out-of-range sink": (json.dumps(huge), "sink must be <= 2**31 - 1"),
        "unknown correction": (json.dumps(unknown), "correction must be one of"),
        "missing key": (json.dumps(missing), "missing key(s) ['hardware']"),
        "not an object": ("[1, 2]", "corrupt: entry must be a JSON object"),
        "old torch": (json.dumps(old_torch), "stale: tuned under torch 1.13.0"),
        "old triton": (json.dumps(old_triton), "stale: tuned under triton 2.0.0"),
        "old kernels": (json.dumps(old_kernels), "stale: tuned with kernels revision '1'"),
        "unrecorded kernels": (json.dumps(unrecorded_kernels), "stale: tuned with kernels revision '(unrecorded)'"),
        "schema": (json.dumps(schema), f"stale: schema {SCHEMA_VERSION + 1}"),
        "deep JSON": ("[" * 200_000 + "]" * 200_000, "corrupt: entry nests JSON deeper than 64 levels"),
        "5000-digit int": (json.dumps(good).replace('"bucket": 4096', '"bucket": ' + "9" * 5000),
                           "corrupt: entry: a JSON integer of 5000 digits"),
        "duplicate key": (json.dumps(good)[:-1] + ', "bucket": 4096}', "corrupt: entry: duplicate key 'bucket'"),
    }


@pytest.mark.parametrize("case", list(_bad_entries()))
def test_corrupt_or_stale_entries_are_ignored_with_one_warning(tmp_path, caplog, case):
    text, why = _bad_entries()[case]
    cache = TunedConfigCache(tmp_path)
    path = _write(cache, 4096, text)
    with caplog.at_level(logging.WARNING, logger="deltapass.cache"):
        assert cache.lookup(cpu(), FP, 4096) is None
        assert cache.lookup(cpu(), FP, 4096) is None                    # asked again: no second warning
        result = cache.resolve(cpu(), FP, 4096)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(path) in warnings[0].getMessage() and why in warnings[0].getMessage()
    assert result.entry is None and why in result.reason
    # A good entry of another bucket never stands in for the broken one.
    cache.save(entry(2048))
    assert cache.lookup(cpu(), FP, 4096) is None and cache.lookup(cpu(), FP, 2048).bucket == 2048


def test_entry_with_a_misnamed_file_is_corrupt(tmp_path):
    cache = TunedConfigCache(tmp_path)
    _write(cache, 8192, entry(4096).to_json())
    [(path, found, status)] = cache.entries()
    assert found is None and status.startswith("corrupt: content is for")


def test_entries_report_every_file(tmp_path):
    cache = TunedConfigCache(tmp_path)
    ok = cache.save(entry(1024))
    bad = _bad_entries()
    broken = _write(cache, 2048, bad["bad json"][0])
    stale = _write(cache, 4096, bad["old torch"][0])
    (cache.config_dir / ".half-written.tmp").write_text("{")            # a writer's temp file: not an entry
    statuses = {path: (found, status) for path, found, status in cache.entries()}
    assert set(statuses) == {ok, broken, stale}
    assert statuses[ok][1] == "ok" and statuses[ok][0] == entry(1024)
    assert statuses[broken][0] is None and statuses[broken][1].startswith("corrupt: bad JSON")
    assert statuses[stale][0] is None and statuses[stale][1].startswith("stale: tuned under torch 1.13.0")


def test_cache_entry_validates_its_fields():
    with pytest.raises(ValueError, match=r"bucket=3000"):
        entry(3000)
    with pytest.raises(ValueError, match=r"fingerprint='xyz'"):
        entry(fingerprint="xyz")
    assert {"created", "deltapass_version"} <= set(CacheEntry(cpu(), FP, 1024, TUNED).meta)


def _returns_within(fn, fifo: Path, seconds: float = 30.0):
    """fn()'s result, or a test failure if it blocks (then the FIFO gets a writer, so the reader is let go)."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))         # a reader waits in open(): release it
        pytest.fail(f"reading the cache blocked on the FIFO {fifo}")
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_entry_is_skipped_unopened(tmp_path, caplog, monkeypatch, capsys):
    """A FIFO made the lookup and `show` wait forever in open(); it is now skipped with one warning."""
    cache = TunedConfigCache(tmp_path)
    cache.save(entry(1024))
    fifo = cache.config_dir / CacheEntry.name_for(cpu(), FP, 4096)
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING, logger="deltapass.cache"):
        result = _returns_within(lambda: cache.resolve(cpu(), FP, 4096), fifo)
        assert _returns_within(lambda: cache.lookup(cpu(), FP, 4096), fifo) is None
    assert result.entry is None and "skipped: not a regular file (a FIFO)" in result.reason
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"ignoring tuned config {fifo} (skipped: not a regular file (a FIFO))"]
    statuses = {path.name: status for path, _, status in _returns_within(cache.entries, fifo)}
    assert statuses == {entry(1024).file_name: "ok", fifo.name: "skipped: not a regular file (a FIFO)"}
    with pytest.raises(OSError):                # no reader holds it open: nothing was left waiting on it
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    from deltapass.cli import main

    assert _returns_within(lambda: main(["show"]), fifo) == 0
    assert f"{fifo.name}: skipped: not a regular file (a FIFO)" in capsys.readouterr().out


def test_an_entry_for_another_device_is_not_ok_here(tmp_path, monkeypatch, capsys):
    """An entry saved for an H200 showed "ok" on a CPU-only machine: only versions were compared."""
    h200 = HardwareKey("NVIDIA H200", "9.0", torch.__version__, cpu().triton_version)
    cache = TunedConfigCache(tmp_path)
    cache.save(entry(4096, hardware=h200))
    cache.save(entry(4096))
    statuses = {path.name: status for path, _, status in cache.entries([cpu()])}
    assert statuses[entry(4096).file_name] == "ok"
    assert statuses[entry(4096, hardware=h200).file_name] == (
        f"other device: tuned on NVIDIA H200 (9.0); this machine has {cpu().device_name} (cpu)")
    # The same decision, given that device: ok there, and stale there under another torch.
    [(_, found, status)] = [e for e in cache.entries([h200]) if e[0].name == entry(4096, hardware=h200).file_name]
    assert status == "ok" and found.hardware == h200
    old_torch = replace(h200, torch_version="1.13.0")
    [status] = [s for p, _, s in cache.entries([old_torch]) if p.name == entry(4096, hardware=h200).file_name]
    assert status == f"stale: tuned under torch {torch.__version__}, running 1.13.0"

    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)      # this machine: the CPU only
    from deltapass.cli import main

    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert f"here: {cpu().device_name} (cpu); torch {torch.__version__}" in out
    assert f"{entry(4096, hardware=h200).file_name}: other device: tuned on NVIDIA H200 (9.0)" in out
    assert f"{entry(4096).file_name}: ok" in out


def test_show_reports_unbounded_json_per_entry(tmp_path, monkeypatch, capsys):
    """`show` died with a RecursionError (deep nesting) or a ValueError (a 5000-digit integer)."""
    cache = TunedConfigCache(tmp_path)
    bad = _bad_entries()
    deep = _write(cache, 2048, bad["deep JSON"][0])
    long_int = _write(cache, 4096, bad["5000-digit int"][0])
    good = cache.save(entry(8192))
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    from deltapass.cli import main

    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert "(3 entries)" in out
    assert f"{deep.name}: corrupt: entry nests JSON deeper than 64 levels" in out
    assert f"{long_int.name}: corrupt: entry: a JSON integer of 5000 digits" in out
    assert f"{good.name}: ok" in out
