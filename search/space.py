"""The search space: what a trial may choose, as plain data plus one function of an Optuna trial.

Two spaces, tuned apart because they answer to different measurements:
  tiles    - launch parameters of the kernels; they move latency only, so they are timed on the op
             alone at the model's attention shape (seconds per candidate, no accuracy run);
  sparsity - one sink + window for all layers, a correction per layer, and a gamma per layer whose
             correction samples rows (delta, recompute); they move accuracy and latency, so each trial
             runs the accuracy tasks and times a whole prefill.

The sink and window rungs are set at REFERENCE_LENGTH (8K) and scale with the prompt: at a length of
2^k x 8K every rung is multiplied by 2^k, so the choices span the same range of attention density at
every length (at 128K: sinks 256-2048, windows 2048-12288, the paper's 1024 + 2048 among them).

A sparsity trial's params (what `suggest` returns and `study.enqueue_trial` takes):
  {"sink_window": "64+256", "layer0": "dense", "layer1": "delta", "gamma1": 32, "layer2": "tail", ...}:
one "layer{i}" per layer, and "gamma{i}" exactly for the layers whose correction is in GAMMA_CORRECTIONS.
`calibrated_seeds` turns a Calibration (search/calibrate.py) into such params: the layers with the
most attention outside sink + window stay dense, the others get a cheap correction.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from deltapass import defaults, presets
from deltapass.config import SITE_CORRECTIONS, DeltaConfig, SiteConfig
from deltapass.kernels import LaunchConfig

from .calibrate import Calibration, rank_layers

log = logging.getLogger("deltapass.search.space")

# (block_m, block_n, num_warps, num_stages): candidates for either kernel; block_m counts
# (query row, query head) pairs (see LaunchConfig).
TILE_CANDIDATES: tuple[tuple[int, int, int, int], ...] = (
    (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
)

# Per-layer corrections, most exact first. "tail" (sparse rows plus the dense tail rows, no sampled
# rows) is offered once the kernels define it; until then it is left out of the default space.
CORRECTION_ORDER: tuple[str, ...] = ("dense", "recompute", "tail", "delta", "none")
DEFAULT_CORRECTIONS: tuple[str, ...] = tuple(c for c in CORRECTION_ORDER if c in SITE_CORRECTIONS)
# Fractions of the layers kept dense by the calibrated seeds; a third closed ~94% of SmolLM2's loss gap.
DEFAULT_DENSE_BUDGETS: tuple[float, ...] = (0.0, 1 / 6, 1 / 4, 1 / 3)
# Corrections of the layers a calibrated seed does not keep dense, best measured first.
DEFAULT_FILLS: tuple[str, ...] = ("tail", "recompute", "delta")
# The corrections whose sampled rows every gamma rows set their cost and accuracy: each such layer gets its own
# gamma. The others ("tail", "none") read gamma only for the length of their dense tail (L mod gamma + 128 rows
# for gamma <= 128), which moves neither cost nor accuracy measurably, so they keep FIXED_GAMMA.
GAMMA_CORRECTIONS: tuple[str, ...] = ("delta", "recompute")
FIXED_GAMMA = presets.SMALL.gamma
# The prompt length the sink and window rungs are given for; longer prompts scale them (SparsitySpace.scale_for).
REFERENCE_LENGTH = 8192


@dataclass(frozen=True)
class SparsitySpace:
    """Choices of one accuracy/latency trial.

    sinks, windows: the rungs at reference_length; windows_for(length) scales them (see scale_for) and keeps
    the pairs with (sink + window) / length <= max_window_density. gammas: each delta / recompute layer's choices.
    """

    sinks: tuple[int, ...] = (16, 32, 64, 128)
    windows: tuple[int, ...] = (128, 256, 512, 768)
    gammas: tuple[int, ...] = (16, 32, 64, 128)
    corrections: tuple[str, ...] = DEFAULT_CORRECTIONS
    max_window_density: float = defaults.MAX_WINDOW_DENSITY
    reference_length: int = REFERENCE_LENGTH

    def __post_init__(self) -> None:
        bad = [c for c in self.corrections if c not in SITE_CORRECTIONS]
        if bad or not self.corrections or len(set(self.corrections)) != len(self.corrections):
            raise ValueError(f"corrections must be distinct values among {SITE_CORRECTIONS}, "
                             f"got corrections={self.corrections}")
        if not 0 < self.max_window_density <= 1:
            raise ValueError(f"max_window_density must be in (0, 1], got {self.max_window_density}")
        for name in ("sinks", "windows", "gammas"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive ints, got {name}={values}")
        if isinstance(self.reference_length, bool) or not isinstance(self.reference_length, int) \
                or self.reference_length < 1:
            raise ValueError(f"reference_length must be a positive int, got reference_length={self.reference_length!r}")

    def scale_for(self, length: int) -> int:
        """The factor of the sink and window rungs at `length`: the largest power of two <= length /
        reference_length, at least 1 (so the rungs keep their fractions of the prompt, in round numbers)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got length={length!r}")
        return 1 << max(0, (length // self.reference_length).bit_length() - 1)

    def windows_for(self, length: int) -> list[tuple[int, int]]:
        """(sink, window) pairs of the rungs scaled to `length`, within the density cap; the smallest pair when
        none fits."""
        scale = self.scale_for(length)
        pairs = [(s * scale, w * scale) for s in self.sinks for w in self.windows
                 if (s + w) * scale <= self.max_window_density * length]
        return pairs or [(min(self.sinks) * scale, min(self.windows) * scale)]


def layer_param(layer: int) -> str:
    """The trial param that holds one layer's correction."""
    return f"layer{layer}"


def gamma_param(layer: int) -> str:
    """The trial param that holds the gamma of a layer whose correction samples rows (GAMMA_CORRECTIONS)."""
    return f"gamma{layer}"


def sink_window_param(sink: int, window: int) -> str:
    return f"{sink}+{window}"


def config_from_choices(choices: dict, layers: int, launch: dict | None = None) -> DeltaConfig:
    """A DeltaConfig from a trial's params (see the module docstring). The most frequent site (correction and
    gamma) becomes the default; the other layers are listed by index."""
    sink, window = (int(x) for x in str(choices["sink_window"]).split("+"))
    launch = dict(launch or {})
    corrections = [choices.get(layer_param(i)) for i in range(layers)]
    expected = {"sink_window"} | {layer_param(i) for i in range(layers)} | \
        {gamma_param(i) for i, c in enumerate(corrections) if c in GAMMA_CORRECTIONS}
    missing, unknown = expected - set(choices), set(choices) - expected
    if missing or unknown:
        raise ValueError(f"choices for {layers} layers: missing {sorted(missing)}, unknown {sorted(unknown)}")
    sites = [SiteConfig(sink=sink, window=window, correction=c, launch=launch,
                        gamma=int(choices[gamma_param(i)]) if c in GAMMA_CORRECTIONS else FIXED_GAMMA)
             for i, c in enumerate(corrections)]
    keys = [(site.correction, site.gamma) for site in sites]
    common = sites[keys.index(Counter(keys).most_common(1)[0][0])]     # ties: the first one met, from layer 0
    return DeltaConfig(default=common, layers={i: site for i, site in enumerate(sites) if site != common})


def suggest(trial, space: SparsitySpace, layers: int, length: int) -> dict:
    """The trial's choices (Optuna's define-by-run API): a layer's gamma is asked only when its correction
    samples rows, so the sampler needs TPESampler(group=True) to model the layers jointly."""
    pairs = [sink_window_param(s, w) for s, w in space.windows_for(length)]
    choices = {"sink_window": trial.suggest_categorical("sink_window", pairs)}
    for layer in range(layers):
        correction = trial.suggest_categorical(layer_param(layer), list(space.corrections))
        choices[layer_param(layer)] = correction
        if correction in GAMMA_CORRECTIONS:
            choices[gamma_param(layer)] = trial.suggest_categorical(gamma_param(layer), list(space.gammas))
    return choices


def _layer_choices(corrections: Sequence[str], gamma: int) -> dict:
    """The per-layer params of `corrections`, with `gamma` on every layer that samples rows."""
    choices: dict = {}
    for layer, correction in enumerate(corrections):
        choices[layer_param(layer)] = correction
        if correction in GAMMA_CORRECTIONS:
            choices[gamma_param(layer)] = gamma
    return choices


def uniform_choices(space: SparsitySpace, layers: int, correction: str, sink_window: str, gamma: int) -> dict:
    """One correction on every layer: the fixed rules the study starts from (enqueued trials)."""
    if correction not in space.corrections:
        raise ValueError(f"correction={correction!r} is not in the space's corrections {space.corrections}")
    return {"sink_window": sink_window, **_layer_choices([correction] * layers, gamma)}


def calibrated_seeds(calibration: Calibration, space: SparsitySpace, layers: int, length: int,
                     budgets: Sequence[float] = DEFAULT_DENSE_BUDGETS, *, fills: Sequence[str] = DEFAULT_FILLS,
                     gamma: int = presets.SMALL.gamma, sink_window: str | None = None) -> list[dict]:
    """Trial params to enqueue: for each fill correction and each budget, round(budget * layers) layers
    with the most attention outside sink + window (rank_layers) kept dense, every other layer on the fill.

    sink_window: the shared "sink+window" of the seeds; default: among the space's pairs at `length`
    that the calibration measured, the one with the least mean mass outside. Fills the space lacks
    (e.g. "tail" before the kernels have it) are skipped. Duplicates are dropped; order: fill, then budget.
    """
    if calibration.layers != layers:
        raise ValueError(f"layers={layers}, but the calibration has {calibration.layers} layers")
    if gamma not in space.gammas:
        raise ValueError(f"gamma={gamma} is not in the space's gammas {space.gammas}")
    for budget in budgets:
        if not 0 <= budget <= 1:
            raise ValueError(f"every budget must be a fraction of the layers in [0, 1], got budget={budget}")
    usable = [p for p in space.windows_for(length) if p in calibration.candidates]
    if sink_window is not None:
        pair = tuple(int(x) for x in str(sink_window).split("+"))
        if pair not in usable:
            raise ValueError(f"sink_window={sink_window!r} is not both in the space at length={length} and "
                             f"calibrated; usable: {[sink_window_param(*p) for p in usable]}")
    elif not usable:
        raise ValueError(f"no (sink, window) of the space at length={length} was calibrated "
                         f"(calibrated: {list(calibration.candidates)}); calibrate with "
                         f"candidates=space.windows_for(length)")
    else:
        pair = min(usable, key=lambda p: (sum(calibration.layer_outside(*p)), p[0] + p[1]))
    sink, window = pair
    offered = [f for f in fills if f in space.corrections and f != "dense"]
    if not offered:
        raise ValueError(f"none of fills={tuple(fills)} is in the space's corrections {space.corrections}")
    if len(offered) < len(fills):
        log.info("calibrated seeds: fills %s are not in the space, skipped",
                 [f for f in fills if f not in offered])
    counts = list(dict.fromkeys(math.floor(budget * layers + 0.5) for budget in budgets))
    if any(counts) and "dense" not in space.corrections:
        raise ValueError(f"budgets={tuple(budgets)} keep layers dense, but 'dense' is not in the space's "
                         f"corrections {space.corrections}")
    ranking = rank_layers(calibration, sink, window)
    seeds = []
    for fill in offered:
        for count in counts:
            dense = set(ranking[:count])
            seed = {"sink_window": sink_window_param(sink, window),
                    **_layer_choices(["dense" if i in dense else fill for i in range(layers)], gamma)}
            if seed not in seeds:
                seeds.append(seed)
    return seeds


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
