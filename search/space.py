"""The search space: what a trial may choose, as plain data plus one function of an Optuna trial.

Two spaces, tuned apart because they answer to different measurements:
  tiles    - launch parameters of the kernels; they move latency only, so they are timed on the op
             alone at the model's attention shape (seconds per candidate, no accuracy run);
  sparsity - sink, window, gamma and a correction per group of adjacent layers; they move accuracy
             and latency, so each trial runs the accuracy tasks and times a whole prefill.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from deltapass.config import SITE_CORRECTIONS, DeltaConfig, SiteConfig
from deltapass.kernels import LaunchConfig

# (block_m, block_n, num_warps, num_stages): candidates for either kernel; block_m counts
# (query row, query head) pairs (see LaunchConfig).
TILE_CANDIDATES: tuple[tuple[int, int, int, int], ...] = (
    (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
)


@dataclass(frozen=True)
class SparsitySpace:
    """Choices of one accuracy/latency trial. max_window_density caps (sink + window) / length."""

    sinks: tuple[int, ...] = (16, 32, 64, 128)
    windows: tuple[int, ...] = (128, 256, 512, 768)
    gammas: tuple[int, ...] = (16, 32, 64, 128)
    corrections: tuple[str, ...] = ("none", "delta", "recompute", "dense")
    groups: int = 6
    max_window_density: float = 0.10

    def __post_init__(self) -> None:
        bad = [c for c in self.corrections if c not in SITE_CORRECTIONS]
        if bad:
            raise ValueError(f"corrections must be among {SITE_CORRECTIONS}, got {bad}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got groups={self.groups}")
        if not 0 < self.max_window_density <= 1:
            raise ValueError(f"max_window_density must be in (0, 1], got {self.max_window_density}")

    def windows_for(self, length: int) -> list[tuple[int, int]]:
        """(sink, window) pairs within the density cap; the smallest pair when none fits."""
        pairs = [(s, w) for s in self.sinks for w in self.windows if s + w <= self.max_window_density * length]
        return pairs or [(min(self.sinks), min(self.windows))]


def layer_groups(layers: int, groups: int) -> list[range]:
    """Adjacent layers in `groups` nearly equal runs (the correction is chosen per run)."""
    groups = min(groups, layers)
    bounds = [round(i * layers / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


def config_from_choices(choices: dict, layers: int, launch: dict | None = None) -> DeltaConfig:
    """A DeltaConfig from a trial's params: {"sink_window": "64+256", "gamma": 64, "group0": "delta", ...}."""
    sink, window = (int(x) for x in str(choices["sink_window"]).split("+"))
    gamma = int(choices["gamma"])
    launch = dict(launch or {})
    corrections = [choices[k] for k in sorted((k for k in choices if k.startswith("group")),
                                              key=lambda k: int(k[5:]))]
    default = SiteConfig(sink=sink, window=window, gamma=gamma, correction="delta", launch=launch)
    layer_configs = {}
    for group, correction in zip(layer_groups(layers, len(corrections)), corrections):
        for layer in group:
            layer_configs[layer] = SiteConfig(sink=sink, window=window, gamma=gamma, correction=correction,
                                              launch=launch)
    return DeltaConfig(default=default, layers=layer_configs)


def suggest(trial, space: SparsitySpace, layers: int, length: int) -> dict:
    """The trial's choices (Optuna's define-by-run API)."""
    pairs = [f"{s}+{w}" for s, w in space.windows_for(length)]
    choices = {"sink_window": trial.suggest_categorical("sink_window", pairs),
               "gamma": trial.suggest_categorical("gamma", list(space.gammas))}
    for g in range(min(space.groups, layers)):
        choices[f"group{g}"] = trial.suggest_categorical(f"group{g}", list(space.corrections))
    return choices


def uniform_choices(space: SparsitySpace, layers: int, correction: str, sink_window: str, gamma: int) -> dict:
    """One correction on every group: the fixed rules the study starts from (enqueued trials)."""
    choices = {"sink_window": sink_window, "gamma": gamma}
    choices.update({f"group{g}": correction for g in range(min(space.groups, layers))})
    return choices


@dataclass(frozen=True)
class TileChoice:
    sparse: tuple[int, int, int, int]
    dense: tuple[int, int, int, int]

    def launch(self) -> dict:
        bm, bn, w, s = self.sparse
        dbm, dbn, dw, ds = self.dense
        return LaunchConfig(bm, bn, w, s, dbm, dbn, dw, ds).to_dict()


@dataclass(frozen=True)
class TileSpace:
    candidates: tuple[tuple[int, int, int, int], ...] = field(default=TILE_CANDIDATES)

    def grid(self) -> dict[str, list[str]]:
        names = ["x".join(map(str, c)) for c in self.candidates]
        return {"sparse": names, "dense": names}

    @staticmethod
    def parse(name: str) -> tuple[int, int, int, int]:
        bm, bn, w, s = (int(x) for x in name.split("x"))
        return bm, bn, w, s
