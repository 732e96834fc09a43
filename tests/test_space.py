"""The sparsity search space: per-layer params, configs from them, and seeds from a calibration."""
from __future__ import annotations

import random

import optuna
import pytest

from deltapass.config import SITE_CORRECTIONS, DeltaConfig
from deltapass.search.calibrate import Calibration, rank_layers
from deltapass import presets
from deltapass.search.space import (DEFAULT_CORRECTIONS, GAMMA_CORRECTIONS, SparsitySpace, calibrated_seeds,
                                    config_from_choices, suggest, uniform_choices)

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
    assert {s["sink_window"] for s in seeds} == {"128+256"}
    assert {v for seed in seeds for k, v in seed.items() if k.startswith("gamma")} == {64}
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
    assert len(seeds) == 1 and seeds[0]["sink_window"] == "64+256"
    assert {seeds[0][f"gamma{i}"] for i in range(LAYERS) if seeds[0][f"layer{i}"] == "recompute"} == {32}
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
        assert set(choices) == {"sink_window"} | {f"layer{i}" for i in range(layers)} | \
            {f"gamma{i}" for i in range(layers) if choices[f"layer{i}"] in GAMMA_CORRECTIONS}
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
    del mixed["gamma1"], mixed["gamma3"]
    config = config_from_choices(mixed, 5)
    assert corrections_of(config, 5) == ["recompute", "dense", "recompute", "dense", "delta"]
    assert config.default.correction == "recompute" and sorted(config.layers) == [1, 3, 4]
    with pytest.raises(ValueError, match="missing \\['layer4'\\]"):
        config_from_choices({k: v for k, v in choices.items() if k != "layer4"}, 5)
    with pytest.raises(ValueError, match="unknown \\['gamma1'\\]"):     # a dense layer has no gamma
        config_from_choices(dict(mixed, gamma1=16), 5)
    with pytest.raises(ValueError, match="missing \\['gamma4'\\]"):     # a delta layer has one
        config_from_choices({k: v for k, v in mixed.items() if k != "gamma4"}, 5)
    with pytest.raises(ValueError, match="unknown \\['group0'\\]"):
        config_from_choices(dict(choices, group0="delta"), 5)
    with pytest.raises(ValueError, match="correction='sideways'"):
        uniform_choices(space, 5, "sideways", "32+256", 16)



# ---- the space at the users' lengths -----------------------------------------------------------------

def test_the_space_at_8k_is_the_rungs_and_below_it_only_the_cap_trims():
    space = SparsitySpace()
    assert space.windows_for(8192) == [(s, w) for s in space.sinks for w in space.windows if s + w <= 819]
    assert space.windows_for(4096) == [(s, w) for s in space.sinks for w in space.windows if s + w <= 409]
    assert space.windows_for(100) == [(16, 128)]                  # nothing fits the cap: the smallest pair


@pytest.mark.parametrize("length", [16384, 32768, 65536, 131072, 100_000, 1 << 20])
def test_windows_scale_with_the_length(length):
    space = SparsitySpace()
    scale = 1 << (length // 8192).bit_length() - 1                # the largest power of two <= length / 8K
    pairs = space.windows_for(length)
    assert pairs == [(s * scale, w * scale) for s in space.sinks for w in space.windows
                     if (s + w) * scale <= 0.1 * length]
    assert max(s + w for s, w in pairs) > 0.05 * length           # the largest pair uses the cap's upper half
    assert {w for _, w in pairs} >= {128 * scale, 512 * scale}


def test_the_128k_space_holds_the_papers_config_and_larger_ones():
    pairs = SparsitySpace().windows_for(131072)
    assert (presets.PAPER.sink, presets.PAPER.window) == (1024, 2048) and (1024, 2048) in pairs
    assert max(w for _, w in pairs) == 12288 and max(s for s, _ in pairs) == 2048
    assert all(s + w <= 13107 for s, w in pairs)
    study = optuna.create_study(directions=["maximize"])
    study.enqueue_trial(uniform_choices(SparsitySpace(), 3, "delta", "1024+2048", 64))
    trial = study.ask()
    config = config_from_choices(suggest(trial, SparsitySpace(), 3, 131072), 3)
    assert config == DeltaConfig(default=presets.PAPER)          # the paper's rule, as a trial of the study


def test_bad_space_arguments_name_the_value():
    with pytest.raises(ValueError, match="windows must be positive ints, got windows=\\(0, 128\\)"):
        SparsitySpace(windows=(0, 128))
    with pytest.raises(ValueError, match="length must be a positive int, got length=0"):
        SparsitySpace().windows_for(0)


def test_per_layer_gamma_round_trips_through_config_from_choices():
    layers = 6
    choices = {"sink_window": "64+256", "layer0": "dense", "layer1": "delta", "gamma1": 16, "layer2": "recompute",
               "gamma2": 128, "layer3": "tail", "layer4": "delta", "gamma4": 16, "layer5": "none"}
    config = config_from_choices(choices, layers)
    assert DeltaConfig.from_dict(config.to_dict()) == config
    sites = [config.for_site(f"model.layers.{i}.self_attn", i) for i in range(layers)]
    assert [(s.correction, s.gamma) for s in sites] == [("dense", 64), ("delta", 16), ("recompute", 128),
                                                         ("tail", 64), ("delta", 16), ("none", 64)]
    assert {(s.sink, s.window) for s in sites} == {(64, 256)}
    # Through a study: the gammas a trial draws are the ones its config holds, and only delta / recompute draw one.
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.TPESampler(
        seed=1, multivariate=True, group=True, n_startup_trials=2))
    for _ in range(12):
        trial = study.ask()
        drawn = suggest(trial, SparsitySpace(), layers, 16384)
        config = config_from_choices(drawn, layers)
        for i in range(layers):
            site = config.for_site(f"model.layers.{i}.self_attn", i)
            expected = drawn.get(f"gamma{i}", 64)
            assert (f"gamma{i}" in drawn) == (site.correction in GAMMA_CORRECTIONS) and site.gamma == expected
        study.tell(trial, random.random())
