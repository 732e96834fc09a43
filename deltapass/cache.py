"""The per-GPU cache of tuned configs: one JSON file per (device, model fingerprint, length bucket).

The tuner writes entries, the backend reads them when the user gave no config. A file
that cannot be trusted (bad JSON, invalid values, another schema, or tuned under other
torch/Triton versions) is skipped with one warning: a cache must never break compilation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .config import DeltaConfig

log = logging.getLogger("deltapass.cache")

SCHEMA_VERSION = 1
MIN_BUCKET = 1024
_CONFIG_DIR = "configs"
_NAME = re.compile(r"^(?P<slug>.+)--(?P<fingerprint>[0-9a-f]{16})--n(?P<bucket>\d+)\.json$")


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

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareKey":
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names) or not all(isinstance(data[n], str) for n in names):
            raise ValueError(f"hardware must be an object with string fields {names}, got hardware={data!r}")
        return cls(**data)


def length_bucket(n: int) -> int:
    """The next power of two >= n, at least 1024: configs are tuned per bucket, not per exact length."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got n={n!r}")
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


# ---- the model fingerprint -------------------------------------------------------------------------

Signature = list[tuple[str, int | None, int | None, int]]


def model_fingerprint(signature: Sequence[Sequence]) -> str:
    """sha256 (first 16 hex) of the canonical JSON of [(site name, q heads, kv heads, head dim), ...]."""
    canonical = json.dumps([list(item) for item in signature], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _hint(size) -> int:
    """An int from a size that may be a SymInt, read from its hint so no guard is added."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is None:
        raise ValueError(f"size {size!r} has no hint (unbacked)")
    return int(hint)


def _tensor_meta(node) -> torch.Tensor:
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"node {node.name!r} has no tensor metadata")
    return value


def signature_from_sites(sites: Iterable) -> Signature:
    """The attention signature of a graph: its replaceable sites (the only ones a config reaches).

    Heads come from Q and from the site's (un-grouped) K, so a GQA model records its real KV
    heads however it expands them. The batch dim is not part of it; in the 3-D
    [batch * heads, seq, head_dim] form heads cannot be told from batch and are recorded as None.
    """
    signature: Signature = []
    for site in sites:
        if not site.replaceable:
            continue
        q, k = _tensor_meta(site.query), _tensor_meta(site.key)
        if q.dim() == 4:
            signature.append((site.name, _hint(q.shape[1]), _hint(k.shape[1]), _hint(q.shape[-1])))
        else:
            signature.append((site.name, None, None, _hint(q.shape[-1])))
    return signature


def query_tokens(sites: Iterable) -> int:
    """The prefill length of a graph: the longest query of its replaceable sites (SymInts by hint)."""
    lengths = [_hint(_tensor_meta(s.query).shape[-2]) for s in sites if s.replaceable]
    if not lengths:
        raise ValueError("no replaceable attention site to read the query length from")
    return max(lengths)


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

    @property
    def file_name(self) -> str:
        return f"{self.hardware.slug}--{self.fingerprint}--n{self.bucket}.json"

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
        return cls.from_dict(json.loads(text))


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
        self._warned: set[tuple[str, int, int]] = set()

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_dir()

    @property
    def config_dir(self) -> Path:
        return self.root / _CONFIG_DIR

    def path_for(self, hardware: HardwareKey, fingerprint: str, bucket: int) -> Path:
        return self.config_dir / f"{hardware.slug}--{fingerprint}--n{bucket}.json"

    def save(self, entry: CacheEntry) -> Path:
        """Write atomically (temp file in the same dir, fsync, rename): readers see the old file or the new."""
        target = self.config_dir / entry.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
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
        log.info("deltapass: saved tuned config %s", target)
        return target

    def lookup(self, hardware: HardwareKey, fingerprint: str, n_tokens: int) -> CacheEntry | None:
        """The entry for n_tokens' bucket, else the largest usable bucket below it, else None."""
        return self.resolve(hardware, fingerprint, n_tokens).entry

    def resolve(self, hardware: HardwareKey, fingerprint: str, n_tokens: int) -> LookupResult:
        """lookup, also saying which file was used or why none was."""
        wanted = length_bucket(n_tokens)
        candidates = []
        for path in self._files():
            match = _NAME.match(path.name)
            if match and match["slug"] == hardware.slug and match["fingerprint"] == fingerprint:
                bucket = int(match["bucket"])
                if bucket <= wanted:
                    candidates.append((bucket != wanted, -bucket, path))   # exact first, then largest below
        problems = []
        for _, _, path in sorted(candidates):
            entry, status = self._read(path, hardware)
            if entry is not None:
                return LookupResult(entry, path, "ok")
            problems.append(f"{path.name}: {status}")
            self._warn_once(path, status)
        if problems:
            return LookupResult(None, None, "no usable entry (" + "; ".join(problems) + ")")
        return LookupResult(None, None, f"no entry for {hardware.slug}, fingerprint {fingerprint}, "
                                        f"bucket <= {wanted} in {self.config_dir}")

    def entries(self) -> list[tuple[Path, CacheEntry | None, str]]:
        """Every entry file with its status: "ok", or why it is unreadable or stale (for `deltapass show`)."""
        out = []
        for path in self._files():
            entry, status = self._read(path, None)
            out.append((path, entry if status == "ok" else None, status))
        return out

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.config_dir.glob("*.json") if not p.name.startswith("."))
        except OSError:
            return []

    def _read(self, path: Path, hardware: HardwareKey | None) -> tuple[CacheEntry | None, str]:
        """(entry, "ok") or (None, "corrupt: ..." / "stale: ..."); versions compare to hardware or the installed ones."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"unreadable: {exc}"
        except json.JSONDecodeError as exc:
            return None, f"corrupt: bad JSON ({exc})"
        if isinstance(data, dict) and data.get("schema") != SCHEMA_VERSION:
            return None, f"stale: schema {data.get('schema')!r}, this deltapass reads schema {SCHEMA_VERSION}"
        try:
            entry = CacheEntry.from_dict(data)
        except Exception as exc:  # any malformed content is "corrupt", never an error of the caller
            return None, f"corrupt: {exc}"
        if entry.file_name != path.name:
            return None, f"corrupt: content is for {entry.file_name}, not this file name"
        torch_version = hardware.torch_version if hardware else torch.__version__
        triton_version = hardware.triton_version if hardware else _triton_version()
        if entry.hardware.torch_version != torch_version:
            return None, f"stale: tuned under torch {entry.hardware.torch_version}, running {torch_version}"
        if entry.hardware.triton_version != triton_version:
            return None, f"stale: tuned under triton {entry.hardware.triton_version}, running {triton_version}"
        return entry, "ok"

    def _warn_once(self, path: Path, status: str) -> None:
        # One warning per bad file version: a model compiles many graphs and each looks it up.
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (str(path), 0, 0)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("deltapass: ignoring tuned config %s (%s)", path, status)


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
