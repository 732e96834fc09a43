"""The sparsity search space: per-layer params, configs from them, and seeds from a calibration."""
from __future__ import annotations

import random

import optuna
import pytest

from deltapass.config import SITE_CORRECTIONS, DeltaConfig
from deltapass.search.calibrate import Calibration, rank_layers
from deltapass.search.space import (DEFAULT_CORRECTIONS, SparsitySpace, calibrated_seeds, config_from_choices,
                                    suggest, uniform_choices)

LAYERS = 13
LENGTH = 4096                      # the default space's density cap admits sink + window <= 409
CANDIDATES = ((64, 256), (128, 256), (1024, 2048))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fake_calibration(seed: int = 0, layers: int = LAYERS) -> Calibration:
    """Random masses outside, smaller for larger sink + window (as real ones are), one K/V head."""
    rng = random.Random(seed)
    base = [rng.uniform(0.05, 0.6) for _ in range(layers)]
    outside = tuple(tuple(m * f * rng.uniform(0.9, 1.1) for m in base) for f in (1.0, 0.8, 0.3))
    return Calibration(model="fake", length=LENGTH, candidates=CANDIDATES, outside=outside,
                       outside_by_head=tuple(tuple((m,) for m in row) for row in outside))


def corrections_of(config: DeltaConfig, layers: int) -> list[str]:
    return [config.for_site(f"model.layers.{i}.self_attn", i).correction for i in range(layers)]


def test_default_corrections_follow_the_kernels():
    # "tail" is offered exactly when deltapass.config knows it; everything offered is a valid site mode.
    assert ("tail" in DEFAULT_CORRECTIONS) == ("tail" in SITE_CORRECTIONS)
    assert {"dense", "recompute", "delta", "none"} <= set(DEFAULT_CORRECTIONS) <= set(SITE_CORRECTIONS)
    with pytest.raises(ValueError, match="corrections"):
        SparsitySpace(corrections=("delta", "sideways"))


@pytest.mark.parametrize("seed", [0, 1])
def test_seeds_keep_the_top_ranked_layers_dense(seed):
    cal, space = fake_calibration(seed), SparsitySpace()
    seeds = calibrated_seeds(cal, space, LAYERS, LENGTH)
    fills = [f for f in ("tail", "recompute", "delta") if f in space.corrections]
    counts = [0, 2, 3, 4]                          # round(b * 13) for b = 0, 1/6, 1/4, 1/3
    assert len(seeds) == len(fills) * len(counts)
    # of the calibrated pairs the space admits at 4096 ((64, 256) and (128, 256)), the one with less mass outside
    assert {s["sink_window"] for s in seeds} == {"128+256"} and {s["gamma"] for s in seeds} == {64}
    ranking = rank_layers(cal, 128, 256)
    for i, seed_params in enumerate(seeds):
        fill, count = fills[i // len(counts)], counts[i % len(counts)]
        config = config_from_choices(seed_params, LAYERS)
        assert DeltaConfig.from_dict(config.to_dict()) == config               # a valid, round-tripping config
        modes = corrections_of(config, LAYERS)
        assert {i for i, m in enumerate(modes) if m == "dense"} == set(ranking[:count])
        assert all(m == fill for i, m in enumerate(modes) if i not in ranking[:count])
        assert (config.default.sink, config.default.window, config.default.gamma) == (128, 256, 64)


def test_seed_options_and_errors():
    cal, space = fake_calibration(), SparsitySpace()
    seeds = calibrated_seeds(cal, space, LAYERS, LENGTH, budgets=(1 / 3, 0.34), fills=("recompute",),
                             gamma=32, sink_window="64+256")
    assert len(seeds) == 1 and seeds[0]["sink_window"] == "64+256" and seeds[0]["gamma"] == 32
    dense = [i for i in range(LAYERS) if seeds[0][f"layer{i}"] == "dense"]
    assert set(dense) == set(rank_layers(cal, 64, 256)[:4])
    for kwargs, match in ((dict(sink_window="1024+2048"), "sink_window='1024\\+2048'"), (dict(gamma=48), "gamma=48"),
                          (dict(budgets=(1.5,)), "budget=1.5"), (dict(fills=("none",)), None)):
        if match is None:      # "none" is in the space: fine
            assert calibrated_seeds(cal, space, LAYERS, LENGTH, **kwargs)
            continue
        with pytest.raises(ValueError, match=match):
            calibrated_seeds(cal, space, LAYERS, LENGTH, **kwargs)
    with pytest.raises(ValueError, match="layers=12"):
        calibrated_seeds(cal, space, 12, LENGTH)
    with pytest.raises(ValueError, match="candidates=space.windows_for"):
        calibrated_seeds(cal, SparsitySpace(sinks=(16,), windows=(128,)), LAYERS, LENGTH)
    with pytest.raises(ValueError, match="'dense' is not in"):
        calibrated_seeds(cal, SparsitySpace(corrections=("delta", "none")), LAYERS, LENGTH)


@pytest.mark.skipif("tail" not in SITE_CORRECTIONS, reason="the kernels do not define 'tail' yet")
def test_tail_seeds_come_first_and_are_valid():
    seeds = calibrated_seeds(fake_calibration(), SparsitySpace(), LAYERS, LENGTH)
    assert corrections_of(config_from_choices(seeds[0], LAYERS), LAYERS) == ["tail"] * LAYERS
    modes = corrections_of(config_from_choices(seeds[3], LAYERS), LAYERS)      # a third dense, the rest tail
    assert sorted(modes) == ["dense"] * 4 + ["tail"] * (LAYERS - 4)


def test_suggest_with_a_real_study_and_enqueued_seeds():
    space, layers, length = SparsitySpace(), 7, LENGTH
    study = optuna.create_study(directions=["maximize", "minimize"])
    seeds = calibrated_seeds(fake_calibration(layers=layers), space, layers, length)
    for seed_params in seeds:
        study.enqueue_trial(seed_params)
    for seed_params in seeds:                   # enqueued seeds come back as the trial's own choices
        trial = study.ask()
        assert suggest(trial, space, layers, length) == seed_params
        study.tell(trial, [1.0, 0.0])
    for _ in range(3):                          # free trials: one param per layer, all within the space
        trial = study.ask()
        choices = suggest(trial, space, layers, length)
        assert set(choices) == {"sink_window", "gamma"} | {f"layer{i}" for i in range(layers)}
        assert set(trial.params) == set(choices)
        config = config_from_choices(choices, layers)
        assert set(corrections_of(config, layers)) <= set(space.corrections)
        assert config.default.sink + config.default.window <= space.max_window_density * length
        study.tell(trial, [0.5, 0.1])


def test_uniform_choices_and_config_errors():
    space = SparsitySpace()
    choices = uniform_choices(space, 5, "recompute", "32+256", 16)
    config = config_from_choices(choices, 5, {"block_m": 64})
    assert config.layers == {} and config.default.correction == "recompute" and config.default.gamma == 16
    assert config.default.launch == {"block_m": 64}
    mixed = dict(choices, layer1="dense", layer3="dense", layer4="delta")
    config = config_from_choices(mixed, 5)
    assert corrections_of(config, 5) == ["recompute", "dense", "recompute", "dense", "delta"]
    assert config.default.correction == "recompute" and sorted(config.layers) == [1, 3, 4]
    with pytest.raises(ValueError, match="missing \\['layer4'\\]"):
        config_from_choices({k: v for k, v in choices.items() if k != "layer4"}, 5)
    with pytest.raises(ValueError, match="unknown \\['group0'\\]"):
        config_from_choices(dict(choices, group0="delta"), 5)
    with pytest.raises(ValueError, match="correction='sideways'"):
        uniform_choices(space, 5, "sideways", "32+256", 16)

