"""The per-model Δ config: a default for every attention site plus overrides by site name or layer.

A config is data. The backend reads it, the tuner writes it, and the op only ever
sees the plain arguments of one SiteConfig.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from deltapass.kernels import LaunchConfig
from deltapass.kernels.rule import CORRECTIONS, check_rule_args

# "dense" leaves a site exact: the pass does not touch it.
SITE_CORRECTIONS = CORRECTIONS + ("dense",)


@dataclass(frozen=True)
class SiteConfig:
    """What one attention site computes. Defaults are the paper's (sink 1024, window 2048, gamma 64, delta)."""

    sink: int = 1024
    window: int = 2048
    gamma: int = 64
    correction: str = "delta"
    launch: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.correction not in SITE_CORRECTIONS:
            raise ValueError(f"correction must be one of {SITE_CORRECTIONS}, got correction={self.correction!r}")
        rule_correction = "delta" if self.correction == "dense" else self.correction
        check_rule_args(self.sink, self.window, self.gamma, rule_correction)
        LaunchConfig.from_kwargs(dict(self.launch))   # validates names and values

    def op_arguments(self) -> dict[str, Any]:
        """Keyword arguments of deltapass.kernels.delta_attention (correction "dense" is not an op mode)."""
        return dict(sink=self.sink, window=self.window, gamma=self.gamma, correction=self.correction,
                    **self.launch)


@dataclass(frozen=True)
class DeltaConfig:
    """A default SiteConfig plus overrides keyed by site name ("model.layers.7.self_attn") or layer index."""

    default: SiteConfig = field(default_factory=SiteConfig)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    layers: dict[int, SiteConfig] = field(default_factory=dict)

    def for_site(self, name: str, layer: int | None) -> SiteConfig:
        """Site name wins over layer index, which wins over the default."""
        if name in self.sites:
            return self.sites[name]
        if layer is not None and layer in self.layers:
            return self.layers[layer]
        return self.default

    def unmatched(self, site_names: list[str], layers: list[int]) -> list[str]:
        """Overrides that match no site of a model: unknown site names, layer indices it does not have."""
        missing = [f"site {name!r} not found" for name in self.sites if name not in site_names]
        missing += [f"layer {layer} not found (layers: {min(layers)}-{max(layers)})" if layers
                    else f"layer {layer} not found (no layer indices)" for layer in self.layers if layer not in layers]
        return missing

    def to_dict(self) -> dict:
        return {"default": asdict(self.default),
                "sites": {name: asdict(c) for name, c in self.sites.items()},
                "layers": {str(layer): asdict(c) for layer, c in sorted(self.layers.items())}}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "DeltaConfig":
        unknown = set(data) - {"default", "sites", "layers"}
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: default, sites, layers")
        default = _site_from_dict(data.get("default", {}), "default")
        sites = {name: _site_from_dict(c, f"sites[{name!r}]", default) for name, c in data.get("sites", {}).items()}
        layers = {}
        for key, c in data.get("layers", {}).items():
            try:
                layer = int(key)
            except ValueError:
                raise ValueError(f"layer keys must be integers, got layers[{key!r}]") from None
            layers[layer] = _site_from_dict(c, f"layers[{key!r}]", default)
        return cls(default=default, sites=sites, layers=layers)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "DeltaConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _site_from_dict(data: dict, where: str, base: SiteConfig | None = None) -> SiteConfig:
    """A SiteConfig from (possibly partial) JSON; missing fields come from base (the default)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {data!r}")
    known = {f.name for f in fields(SiteConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    try:
        return replace(base or SiteConfig(), **data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
