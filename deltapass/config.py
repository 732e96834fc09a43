"""The per-model Δ config: a default for every attention site plus overrides by site name or layer.

A config is data. The backend reads it, the tuner writes it, and the op only ever
sees the plain arguments of one SiteConfig.

Any config that is not valid raises ValueError naming where in the config the problem is
(e.g. "layers['3'].launch must be an object of launch parameters, got a list"). The rule's
and the launch parameters' own bounds are checked by kernels/ (check_rule_args, LaunchConfig);
this module checks the structure around them.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from deltapass.kernels import LaunchConfig
from deltapass.kernels.rule import CORRECTIONS, check_rule_args

from .bounded_json import parse_json, read_text_file

# "dense" leaves a site exact: the pass does not touch it.
SITE_CORRECTIONS = CORRECTIONS + ("dense",)
CONFIG_KEYS = ("default", "sites", "layers")
_RULE_FIELDS = ("sink", "window", "gamma")


@dataclass(frozen=True)
class SiteConfig:
    """What one attention site computes. Defaults are the paper's (sink 1024, window 2048, gamma 64, delta)."""

    sink: int = 1024
    window: int = 2048
    gamma: int = 64
    correction: str = "delta"
    launch: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Any invalid field is a ValueError naming it (booleans are not integers)."""
        for name in _RULE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {name}={value!r} ({_kind(value)})")
        if not isinstance(self.correction, str) or self.correction not in SITE_CORRECTIONS:
            raise ValueError(f"correction must be one of {SITE_CORRECTIONS}, got correction={self.correction!r}")
        if not isinstance(self.launch, Mapping):
            raise ValueError(f"launch must be an object of launch parameters, got {_kind(self.launch)}: "
                             f"launch={self.launch!r}")
        for key, value in self.launch.items():
            if not isinstance(key, str):
                raise ValueError(f"launch keys must be parameter names, got {key!r} ({_kind(key)})")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"launch.{key} must be an integer, got {key}={value!r} ({_kind(value)})")
        rule_correction = "delta" if self.correction == "dense" else self.correction
        try:   # the bounds live with the rule and the kernels
            check_rule_args(self.sink, self.window, self.gamma, rule_correction)
            LaunchConfig.from_kwargs(dict(self.launch))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(self, "launch", dict(self.launch))   # a private copy: the config stays what it was

    def op_arguments(self) -> dict[str, Any]:
        """Keyword arguments of deltapass.kernels.delta_attention (correction "dense" is not an op mode)."""
        return dict(sink=self.sink, window=self.window, gamma=self.gamma, correction=self.correction,
                    **self.launch)


@dataclass(frozen=True)
class DeltaConfig:
    """A default SiteConfig plus overrides keyed by site name ("model.layers.7.self_attn") or layer index (>= 0)."""

    default: SiteConfig = field(default_factory=SiteConfig)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    layers: dict[int, SiteConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, SiteConfig):
            raise ValueError(f"default must be a SiteConfig, got default={self.default!r}")
        for name, table in (("sites", self.sites), ("layers", self.layers)):
            if not isinstance(table, Mapping):
                raise ValueError(f"{name} must be a dict of SiteConfig overrides, got {name}={table!r}")
        for key, site in self.sites.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"sites keys must be non-empty site names, got sites[{key!r}]")
            if not isinstance(site, SiteConfig):
                raise ValueError(f"sites[{key!r}] must be a SiteConfig, got {site!r}")
        for key, site in self.layers.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise ValueError(f"layers keys must be layer indices >= 0, got layers[{key!r}]")
            if not isinstance(site, SiteConfig):
                raise ValueError(f"layers[{key!r}] must be a SiteConfig, got {site!r}")
        object.__setattr__(self, "sites", dict(self.sites))
        object.__setattr__(self, "layers", dict(self.layers))

    def for_site(self, name: str, layer: int | None) -> SiteConfig:
        """Site name wins over layer index, which wins over the default."""
        if name in self.sites:
            return self.sites[name]
        if layer is not None and layer in self.layers:
            return self.layers[layer]
        return self.default

    def unmatched(self, site_names: list[str], layers: list[int]) -> list[str]:
        """Overrides that match no site of a model with these site names and layer indices, one line each.

        Empty when every override applies somewhere. For the compiler pass and explain() to report:
        a misspelled site name or a layer past the model's last is otherwise silently ignored.
        """
        known_names = set(site_names)
        known_layers = {layer for layer in layers if layer is not None}     # sites outside any layer give None
        found = []
        for name in sorted(set(self.sites) - known_names):
            close = difflib.get_close_matches(name, sorted(known_names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append(f"sites[{name!r}] matches no attention site of the model{hint}")
        for layer in sorted(set(self.layers) - known_layers):
            found.append(f"layers['{layer}'] matches no attention layer of the model (its layers: "
                         f"{_describe_layers(sorted(known_layers))})")
        return found

    def to_dict(self) -> dict:
        return {"default": asdict(self.default),
                "sites": {name: asdict(c) for name, c in self.sites.items()},
                "layers": {str(layer): asdict(c) for layer, c in sorted(self.layers.items())}}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Any) -> "DeltaConfig":
        """Parse (possibly partial) JSON data; fields missing from an override come from the default."""
        if not isinstance(data, Mapping):
            raise ValueError(f"config must be an object with keys {', '.join(CONFIG_KEYS)}, got {_kind(data)}")
        unknown = sorted(set(data) - set(CONFIG_KEYS), key=repr)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known: {', '.join(CONFIG_KEYS)}")
        default = _site_from_dict(data.get("default", {}), "default")
        sites = {}
        for name, c in _table(data, "sites").items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"sites keys must be non-empty site names, got sites[{name!r}]")
            sites[name] = _site_from_dict(c, f"sites[{name!r}]", default)
        layers = {}
        for key, c in _table(data, "layers").items():
            layer = _layer_index(key)
            if layer in layers:
                raise ValueError(f"layers[{key!r}] repeats layer {layer}")
            layers[layer] = _site_from_dict(c, f"layers[{key!r}]", default)
        return cls(default=default, sites=sites, layers=layers)

    @classmethod
    def from_text(cls, text: str) -> "DeltaConfig":
        """A config from JSON text (bounded in size and depth, no duplicate keys: bounded_json.parse_json)."""
        if not isinstance(text, str):
            raise ValueError(f"config text must be a str, got {_kind(text)}")
        try:
            data = parse_json(text, "config")
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON ({exc}): {_clip(text)!r}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DeltaConfig":
        """A config from a JSON file (any file the user names, a pipe included; at most MAX_JSON_BYTES)."""
        try:
            text = read_text_file(path)
        except (OSError, ValueError) as exc:     # ValueError: not UTF-8, too large, a NUL in the name
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"cannot read config file {os.fspath(path)!r}: {reason}") from None
        try:
            return cls.from_text(text)
        except ValueError as exc:
            raise ValueError(f"config file {os.fspath(path)!r}: {exc}") from None

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "DeltaConfig":
        """JSON text or a JSON file: a Path is a file; a str is JSON if it parses as JSON, else a file if one exists."""
        if isinstance(text_or_path, os.PathLike):
            return cls.from_file(text_or_path)
        if not isinstance(text_or_path, str):
            raise ValueError(f"config must be JSON text or a file path, got {_kind(text_or_path)}")
        try:
            data = parse_json(text_or_path, "config")
        except json.JSONDecodeError as exc:     # a file name, or text that is not JSON (a limit error is raised)
            if _names_a_file(text_or_path):
                return cls.from_file(text_or_path)
            raise ValueError(f"config {_clip(text_or_path)!r} is neither JSON text ({exc}) nor an existing "
                             f"file") from None
        return cls.from_dict(data)


def _site_from_dict(data: Any, where: str, base: SiteConfig | None = None) -> SiteConfig:
    """A SiteConfig from (possibly partial) JSON; missing fields come from base (the default)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object of site fields, got {_kind(data)}: {_clip(repr(data))}")
    known = [f.name for f in fields(SiteConfig)]
    unknown = sorted(set(data) - set(known), key=repr)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; known: {known}")
    if "launch" in data and not isinstance(data["launch"], Mapping):
        raise ValueError(f"{where}.launch must be an object of launch parameters, got {_kind(data['launch'])}")
    try:
        return replace(base or SiteConfig(), **data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _table(data: Mapping, key: str) -> Mapping:
    table = data.get(key, {})
    if not isinstance(table, Mapping):
        raise ValueError(f"{key} must be an object of overrides keyed by "
                         f"{'site name' if key == 'sites' else 'layer index'}, got {_kind(table)}")
    return table


def _layer_index(key: Any) -> int:
    """A layer key: an int >= 0, or its decimal string (JSON object keys are strings)."""
    if isinstance(key, int) and not isinstance(key, bool):
        layer = key
    elif isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key) and str(int(key)) == key:
        layer = int(key)
    else:
        raise ValueError(f"layers keys must be layer indices as decimal integers (no leading zeros), "
                         f"got layers[{key!r}]")
    if layer < 0:
        raise ValueError(f"layers keys must be layer indices >= 0, got layers[{key!r}]")
    return layer


def _kind(value: Any) -> str:
    """How a value reads in an error: JSON's names for JSON's types."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for types, name in ((Mapping, "an object"), ((list, tuple), "a list"), (str, "a string"), (int, "an integer"),
                        (float, "a number")):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"


def _names_a_file(text: str) -> bool:
    try:
        return bool(text) and Path(text).is_file()
    except (OSError, ValueError):     # too long a name, a NUL byte: JSON text, surely
        return False


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_layers(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))
