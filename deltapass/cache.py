"""The per-GPU cache of tuned configs: one JSON file per (device, model fingerprint, length bucket).

The tuner writes entries, the backend reads them when the user gave no config. A file
that cannot be trusted (bad or unbounded JSON, invalid values, another schema, tuned under other
torch/Triton versions or kernels, not a regular file) is skipped with one warning: a cache must
never break compilation. Whether an entry serves a device is one decision, `usable_status`, which
the lookup and `deltapass show` share.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from deltapass.kernels.dispatch import KERNELS_REVISION

from .bounded_json import JSONLimitError, NotARegularFile, parse_json, read_text_file
from .config import DeltaConfig

log = logging.getLogger("deltapass.cache")

SCHEMA_VERSION = 1
MIN_BUCKET = 1024
_CONFIG_DIR = "configs"
_NAME = re.compile(r"^(?P<slug>.+)--(?P<fingerprint>[0-9a-f]{16})--n(?P<bucket>\d+)\.json$")
# A save's temporary file: hidden, named for its writer (host, pid) so a later save can tell a dead writer's.
_TEMP = re.compile(r"^\.(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
# A save writes a few KB and renames: a temporary file this old has no live writer, whoever made it.
STALE_TEMP_SECONDS = 600


def cache_dir() -> Path:
    """$DELTAPASS_CACHE_DIR, else the user's XDG cache dir ($XDG_CACHE_HOME/deltapass, ~/.cache/deltapass)."""
    override = os.environ.get("DELTAPASS_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("deltapass", appauthor=False)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class HardwareKey:
    """What a tuned config is valid for: the device model, and the software that ran the kernels."""

    device_name: str
    capability: str          # "9.0" for CUDA devices, "cpu" for the CPU
    torch_version: str
    triton_version: str
    kernels: str = KERNELS_REVISION     # kernels.dispatch.KERNELS_REVISION: another revision runs at other speeds

    @classmethod
    def current(cls, device: str | torch.device) -> "HardwareKey":
        dev = torch.device(device)
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            name, capability = torch.cuda.get_device_name(index), f"{major}.{minor}"
        elif dev.type == "cpu":
            name, capability = platform.processor() or platform.machine() or "unknown", "cpu"
        else:  # mps, xpu, ...: no finer identity that torch exposes uniformly
            name, capability = dev.type, dev.type
        return cls(name, capability, torch.__version__, _triton_version())

    @property
    def slug(self) -> str:
        """File-name part naming the device model; versions are checked on load (stale), not in the name."""
        return f"{_slugify(self.device_name)}-{_slugify(self.capability)}"

    @property
    def device_label(self) -> str:
        return f"{self.device_name} ({self.capability})"

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareKey":
        names = [f.name for f in fields(cls)]
        if isinstance(data, dict):
            data = {"kernels": "", **data}    # entries written before the revision was recorded: stale on load
        if not isinstance(data, dict) or set(data) != set(names) or not all(isinstance(data[n], str) for n in names):
            raise ValueError(f"hardware must be an object with string fields {names}, got hardware={data!r}")
        return cls(**data)


def length_bucket(n: int) -> int:
    """The next power of two >= n, at least 1024: configs are tuned per bucket, not per exact length."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got n={n!r}")
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def bucket_lengths(bucket: int) -> tuple[int, int]:
    """(lo, hi): the bucket holds the lengths lo < n <= hi."""
    return (0 if bucket <= MIN_BUCKET else bucket // 2), bucket


# ---- entries ---------------------------------------------------------------------------------------

def default_meta() -> dict[str, Any]:
    from . import __version__

    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "deltapass_version": __version__}


@dataclass
class CacheEntry:
    """One tuned config and what it was tuned for; meta is free-form (study, objectives, created, version)."""

    hardware: HardwareKey
    fingerprint: str
    bucket: int
    config: DeltaConfig
    meta: dict = field(default_factory=default_meta)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not (isinstance(self.fingerprint, str) and re.fullmatch(r"[0-9a-f]{16}", self.fingerprint)):
            raise ValueError(f"fingerprint must be 16 lowercase hex digits, got fingerprint={self.fingerprint!r}")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket != length_bucket(self.bucket):
            raise ValueError(f"bucket must be a power of two >= {MIN_BUCKET}, got bucket={self.bucket!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got meta={self.meta!r}")

    @staticmethod
    def name_for(hardware: HardwareKey, fingerprint: str, bucket: int) -> str:
        return f"{hardware.slug}--{fingerprint}--n{bucket}.json"

    @property
    def file_name(self) -> str:
        return self.name_for(self.hardware, self.fingerprint, self.bucket)

    def to_dict(self) -> dict:
        return {"schema": self.schema, "hardware": asdict(self.hardware), "fingerprint": self.fingerprint,
                "bucket": self.bucket, "config": self.config.to_dict(), "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "CacheEntry":
        """Parse and validate; any problem is a ValueError (the schema is checked by the caller)."""
        if not isinstance(data, dict):
            raise ValueError(f"entry must be a JSON object, got {type(data).__name__}")
        missing = {"schema", "hardware", "fingerprint", "bucket", "config"} - set(data)
        if missing:
            raise ValueError(f"missing key(s) {sorted(missing)}")
        if not isinstance(data["config"], dict):
            raise ValueError(f"config must be an object, got config={data['config']!r}")
        return cls(hardware=HardwareKey.from_dict(data["hardware"]), fingerprint=data["fingerprint"],
                   bucket=data["bucket"], config=DeltaConfig.from_dict(data["config"]),
                   meta=data.get("meta", {}), schema=data["schema"])

    @classmethod
    def from_json(cls, text: str) -> "CacheEntry":
        return cls.from_dict(parse_json(text, "entry"))


def local_hardware() -> list[HardwareKey]:
    """The devices of this machine as the cache names them: the CPU, then each CUDA device."""
    keys = [HardwareKey.current("cpu")]
    if torch.cuda.is_available():
        keys += [HardwareKey.current(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return keys


def usable_status(entry: CacheEntry, here: Sequence[HardwareKey]) -> str:
    """"ok" when `entry` serves one of the devices `here` as it is now (same device model, torch, Triton and
    kernels revision), else why not ("other device: ..." or "stale: ...")."""
    same_model = [key for key in here if key.slug == entry.hardware.slug]
    if not same_model:
        devices = ", ".join(dict.fromkeys(key.device_label for key in here)) or "none"
        return f"other device: tuned on {entry.hardware.device_label}; this machine has {devices}"
    key = same_model[0]
    if entry.hardware.torch_version != key.torch_version:
        return f"stale: tuned under torch {entry.hardware.torch_version}, running {key.torch_version}"
    if entry.hardware.triton_version != key.triton_version:
        return f"stale: tuned under triton {entry.hardware.triton_version}, running {key.triton_version}"
    if entry.hardware.kernels != key.kernels:
        return (f"stale: tuned with kernels revision {entry.hardware.kernels or '(unrecorded)'!r}, "
                f"running {key.kernels!r}")
    return "ok"


class UnusableEntry(ValueError):
    """An entry's text that the cache would not use; the message is its status ("corrupt: ..." or "stale: ...")."""


def parse_entry(text: str) -> CacheEntry:
    """The entry in `text`, validated as the cache reads its files: bounded strict JSON (bounded_json), this
    schema, valid values; else UnusableEntry. (Whether it serves a device is usable_status's question.)"""
    try:
        data = parse_json(text, "entry")
    except JSONLimitError as exc:
        raise UnusableEntry(f"corrupt: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UnusableEntry(f"corrupt: bad JSON ({exc})") from None
    if isinstance(data, dict) and data.get("schema") != SCHEMA_VERSION:
        raise UnusableEntry(f"stale: schema {data.get('schema')!r}, this deltapass reads schema {SCHEMA_VERSION}")
    try:
        return CacheEntry.from_dict(data)
    except Exception as exc:  # any malformed content is "corrupt", never an error of the caller
        raise UnusableEntry(f"corrupt: {exc}") from None


def read_entry(path: str | os.PathLike, *, regular_only: bool = False) -> CacheEntry:
    """parse_entry of a file's text; a file over the JSON size limit is UnusableEntry ("corrupt: ...").
    OSError and UnicodeDecodeError (NotARegularFile with regular_only) pass through."""
    try:
        text = read_text_file(path, regular_only=regular_only)
    except JSONLimitError as exc:
        raise UnusableEntry(f"corrupt: {exc}") from None
    return parse_entry(text)


# ---- the cache -------------------------------------------------------------------------------------

@dataclass
class LookupResult:
    """What lookup found: the entry and its file, or None and why (for the backend's log line)."""

    entry: CacheEntry | None
    path: Path | None
    reason: str


class TunedConfigCache:
    """Tuned configs under root/configs (root defaults to cache_dir(), read at each use so the env counts)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self._root = Path(root) if root is not None else None
        # What this cache object already told the user (one line per file version / bucket).
        self._warned: set[tuple[str, int, int]] = set()
        self._announced: set[tuple[str, Any]] = set()

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_dir()

    @property
    def config_dir(self) -> Path:
        return self.root / _CONFIG_DIR

    def save(self, entry: CacheEntry) -> Path:
        """Write atomically (temp file in the same dir, fsync, rename): readers see the old file or the new.

        The file gets mode 0o666 less the umask, as any file the user creates (0o644 under umask 022), so
        the other users of a shared cache can read it. Temporary files that earlier saves left behind
        (a writer killed before its rename) are removed first; see _remove_stale_temp_files.
        """
        target = self.config_dir / entry.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(target.parent)
        tmp = target.parent / f".{_slugify(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        # os.open's mode goes through the umask (mkstemp's 0o600 would not); O_EXCL: never another's file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(entry.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        log.info("saved tuned config %s", target)
        return target

    def check_writable(self) -> None:
        """Raise ValueError naming the directory when entries cannot be saved there (before a long tuning run)."""
        try:
            self.config_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.config_dir, prefix=".", suffix=".probe")
            os.close(fd)
            Path(tmp).unlink()
        except OSError as exc:
            raise ValueError(f"the tuned-config cache {self.config_dir} is not writable ({exc}); "
                             "set DELTAPASS_CACHE_DIR to a writable directory") from None

    def lookup(self, hardware: HardwareKey, fingerprint: str, n_tokens: int) -> CacheEntry | None:
        """The entry tuned for n_tokens' length bucket, else None."""
        return self.resolve(hardware, fingerprint, n_tokens).entry

    def resolve(self, hardware: HardwareKey, fingerprint: str, n_tokens: int) -> LookupResult:
        """lookup, also saying which file was used or why none was.

        An entry serves only the bucket it was tuned in (lengths in (bucket/2, bucket], or up to
        1024 for the smallest): a config tuned at 8K says nothing about 128K, where the trade-off
        between sparsity, accuracy and speed is another one. Other lengths get no entry, and the
        reason names the nearest tuned bucket and the command that tunes this one.
        """
        wanted = length_bucket(n_tokens)
        path = self.config_dir / CacheEntry.name_for(hardware, fingerprint, wanted)
        if path.exists():
            entry, status = self._read(path, [hardware])
            if entry is not None:
                return LookupResult(entry, path, "ok")
            self._warn_once(path, status)
            return LookupResult(None, None, f"no usable entry ({path.name}: {status})")
        tuned = self.buckets(hardware, fingerprint)
        if not tuned:
            return LookupResult(None, None, f"no tuned config for {hardware.slug}, fingerprint {fingerprint} "
                                            f"in {self.config_dir}")
        nearest = min(tuned, key=lambda b: (abs(b.bit_length() - wanted.bit_length()), b))
        return LookupResult(None, None, f"no tuned config for {n_tokens} tokens (bucket {wanted}); the nearest "
                                        f"tuned bucket is {nearest}; tune this length with "
                                        f"`deltapass tune --length {n_tokens}`")

    def buckets(self, hardware: HardwareKey, fingerprint: str) -> list[int]:
        """Length buckets that have an entry file for this device and model (readable or not)."""
        found = []
        for path in self._files():
            match = _NAME.match(path.name)
            if match and match["slug"] == hardware.slug and match["fingerprint"] == fingerprint:
                found.append(int(match["bucket"]))
        return sorted(found)

    def announce(self, result: LookupResult, n_tokens: int, fallback_name: str) -> None:
        """One WARNING per entry file, or per missing bucket, per cache object: what the backend will use."""
        if result.entry is not None:
            key = ("use", str(result.path))
            message = (f"using tuned config {result.path} (bucket {result.entry.bucket}) for {n_tokens} tokens")
        else:
            key = ("miss", length_bucket(n_tokens))
            message = f"using the {fallback_name} for {n_tokens} tokens: {result.reason}"
        if key not in self._announced:
            self._announced.add(key)
            log.warning(message)
        else:
            log.debug(message)

    def entries(self, here: Sequence[HardwareKey] | None = None) -> list[tuple[Path, CacheEntry | None, str]]:
        """Every entry file with its status (for `deltapass show`): "ok" when one of the devices `here`
        (default: this machine's, local_hardware()) can use it as the lookup would, else why not."""
        here = local_hardware() if here is None else list(here)
        out = []
        for path in self._files():
            entry, status = self._read(path, here)
            out.append((path, entry if status == "ok" else None, status))
        return out

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.config_dir.glob("*.json") if not p.name.startswith("."))
        except OSError:
            return []

    def _read(self, path: Path, here: Sequence[HardwareKey]) -> tuple[CacheEntry | None, str]:
        """(entry, "ok") or (None, "skipped: ..." / "unreadable: ..." / "corrupt: ..." / usable_status's reason)."""
        try:
            entry = read_entry(path, regular_only=True)
        except NotARegularFile as exc:           # a FIFO would block the reader: never opened, never waited on
            return None, f"skipped: {exc}"
        except UnusableEntry as exc:
            return None, str(exc)
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"unreadable: {exc}"
        if entry.file_name != path.name:
            return None, f"corrupt: content is for {entry.file_name}, not this file name"
        status = usable_status(entry, here)
        return (entry, status) if status == "ok" else (None, status)

    def _warn_once(self, path: Path, status: str) -> None:
        # One warning per bad file version: a model compiles many graphs and each looks it up.
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (str(path), 0, 0)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("ignoring tuned config %s (%s)", path, status)


def _remove_stale_temp_files(directory: Path) -> None:
    """Remove the temporary files of saves that never finished, never a live writer's.

    A temp file is stale when its writer, named in the file name, was on this host and is no longer
    running, or when it is older than STALE_TEMP_SECONDS whoever wrote it (another host's writer,
    whose pid says nothing here, or a name from an older deltapass). A save takes milliseconds, so a
    concurrent writer's file is always younger than that, and its writer alive: it is kept.
    """
    host, now = _slugify(socket.gethostname()), time.time()
    try:
        candidates = [e for e in os.scandir(directory) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return
    for item in candidates:
        try:
            info = item.stat(follow_symlinks=False)
            named = _TEMP.match(item.name)
            dead_writer = named is not None and named["host"] == host and not _process_exists(int(named["pid"]))
            if dead_writer or now - info.st_mtime > STALE_TEMP_SECONDS:
                os.unlink(item.path)
                log.info("removed the stale temporary file %s", item.path)
        except OSError:          # gone already (another save cleaned it), or not ours to remove
            continue


def _process_exists(pid: int) -> bool:
    """False only when no process has this pid; a doubt (another user's process, no signals) counts as alive."""
    if pid <= 0:                 # kill(0) would signal our own group: no writer's pid
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # PermissionError: another user's process
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
