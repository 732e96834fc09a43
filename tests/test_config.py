"""DeltaConfig / SiteConfig: every malformed config is a ValueError naming its place; JSON round trips."""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

import deltapass.bounded_json
import deltapass.config
from deltapass.config import DeltaConfig, SiteConfig


def _random_site(rng: random.Random, launch: bool) -> SiteConfig:
    tiles = {"block_m": rng.choice([16, 32, 64]), "num_warps": rng.choice([2, 4, 8])}
    return SiteConfig(sink=rng.randrange(0, 2000), window=rng.randrange(1, 5000), gamma=rng.randrange(1, 300),
                      correction=rng.choice(deltapass.config.SITE_CORRECTIONS), launch=tiles if launch else {})


def _random_config(rng: random.Random) -> DeltaConfig:
    layers = rng.sample(range(0, 61), 3)
    return DeltaConfig(default=_random_site(rng, launch=True),
                       sites={f"model.layers.{i}.self_attn": _random_site(rng, launch=rng.random() < 0.5)
                              for i in rng.sample(range(0, 61), 2)},
                       layers={i: _random_site(rng, launch=rng.random() < 0.5) for i in layers})


# ---- structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["default", "layers['3']", "sites['model.layers.0.self_attn']"])
def test_launch_must_be_an_object(where):
    data = {"launch": [["block_m", 64]]}
    config = {"default": data} if where == "default" else \
        {"layers": {"3": data}} if where.startswith("layers") else {"sites": {"model.layers.0.self_attn": data}}
    message = re.escape(f"{where}.launch must be an object of launch parameters, got a list")
    with pytest.raises(ValueError, match=message):
        DeltaConfig.from_dict(config)
    with pytest.raises(ValueError, match=message):
        DeltaConfig.from_json(json.dumps(config))
    with pytest.raises(ValueError, match=r"launch must be an object of launch parameters, got a list"):
        SiteConfig(launch=[("block_m", 64)])


@pytest.mark.parametrize("key,value,kind", [("layers", [{"gamma": 16}], "a list"), ("sites", ["a"], "a list"),
                                            ("layers", "3", "a string"), ("sites", None, "null")])
def test_override_tables_must_be_objects(key, value, kind):
    with pytest.raises(ValueError, match=rf"^{key} must be an object of overrides keyed by .*, got {kind}$"):
        DeltaConfig.from_json(json.dumps({key: value}))


@pytest.mark.parametrize("text,kind", [("[1, 2]", "a list"), ("null", "null"), ("7", "an integer"),
                                       ('"default"', "a string"), ("true", "a boolean")])
def test_a_config_must_be_an_object(text, kind):
    with pytest.raises(ValueError, match=rf"^config must be an object with keys default, sites, layers, got {kind}$"):
        DeltaConfig.from_json(text)


@pytest.mark.parametrize("overrides", [{"default": 3}, {"layers": {"2": [64]}}, {"sites": {"a.b": None}}])
def test_a_site_must_be_an_object(overrides):
    where = next(iter(overrides)) if "default" in overrides else \
        f"{next(iter(overrides))}[{next(iter(next(iter(overrides.values()))))!r}]"
    with pytest.raises(ValueError, match=rf"^{re.escape(where)} must be an object of site fields"):
        DeltaConfig.from_dict(overrides)


@pytest.mark.parametrize("key", ["-1", "-7", "03", "1.0", "x", "", " 2", "\u0663"])
def test_layer_keys_are_non_negative_decimal_integers(key):
    with pytest.raises(ValueError, match=rf"layers keys must be layer indices .*got layers\[{re.escape(repr(key))}\]"):
        DeltaConfig.from_json(json.dumps({"layers": {key: {"gamma": 16}}}))


@pytest.mark.parametrize("layers", [{-1: SiteConfig()}, {True: SiteConfig()}, {"2": SiteConfig()}])
def test_constructed_layer_keys_are_checked_too(layers):
    with pytest.raises(ValueError, match=r"layers keys must be layer indices >= 0"):
        DeltaConfig(layers=layers)


def test_constructed_overrides_are_checked():
    with pytest.raises(ValueError, match=r"sites must be a dict of SiteConfig overrides"):
        DeltaConfig(sites=[SiteConfig()])
    with pytest.raises(ValueError, match=r"sites\['a'\] must be a SiteConfig, got \{'gamma': 3\}"):
        DeltaConfig(sites={"a": {"gamma": 3}})
    with pytest.raises(ValueError, match=r"default must be a SiteConfig"):
        DeltaConfig(default={"sink": 3})


def test_a_layer_given_twice_is_an_error():
    with pytest.raises(ValueError, match=r"layers\[2\] repeats layer 2"):
        DeltaConfig.from_dict({"layers": {"2": {}, 2: {}}})


@pytest.mark.parametrize("field,value,kind", [("sink", True, "a boolean"), ("window", False, "a boolean"),
                                              ("gamma", 1.5, "a number"), ("sink", "64", "a string"),
                                              ("gamma", None, "null")])
def test_rule_fields_are_integers_not_booleans(field, value, kind):
    message = rf"{field} must be an integer, got {field}={re.escape(repr(value))} \({kind}\)"
    with pytest.raises(ValueError, match=rf"^layers\['4'\]: {message}"):
        DeltaConfig.from_dict({"layers": {"4": {field: value}}})
    with pytest.raises(ValueError, match=rf"^{message}"):
        SiteConfig(**{field: value})


@pytest.mark.parametrize("value", [True, 64.0, "64", None])
def test_launch_values_are_integers_not_booleans(value):
    with pytest.raises(ValueError, match=rf"^sites\['s'\]: launch.block_m must be an integer"):
        DeltaConfig.from_dict({"sites": {"s": {"launch": {"block_m": value}}}})
    with pytest.raises(ValueError, match=r"^launch.block_m must be an integer"):
        SiteConfig(launch={"block_m": value})


def test_unknown_keys_are_named_with_their_place():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['layer'\]; known: default, sites, layers"):
        DeltaConfig.from_dict({"layer": {}})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gama'\] in layers\['1'\]"):
        DeltaConfig.from_dict({"layers": {"1": {"gama": 3}}})
    with pytest.raises(ValueError, match=r"^sites\['s'\]: unknown launch parameter\(s\) \['blockm'\]"):
        DeltaConfig.from_dict({"sites": {"s": {"launch": {"blockm": 64}}}})
    with pytest.raises(ValueError, match=r"sites keys must be non-empty site names, got sites\[''\]"):
        DeltaConfig.from_dict({"sites": {"": {}}})


def test_every_site_goes_through_the_rule_and_launch_validators(monkeypatch):
    """The bounds live in kernels/ (check_rule_args, LaunchConfig); each site of a config must reach them."""
    def bounded_rule(sink, window, gamma, correction):
        if max(sink, window, gamma) > 2**31:
            raise ValueError(f"too large: sink={sink}")

    class BoundedLaunch:
        @staticmethod
        def from_kwargs(launch):
            if any(v > 2**31 for v in launch.values()):
                raise ValueError(f"launch too large: {launch}")

    monkeypatch.setattr(deltapass.config, "check_rule_args", bounded_rule)
    monkeypatch.setattr(deltapass.config, "LaunchConfig", BoundedLaunch)
    for where, data in (("default", {"default": {"sink": 2**70}}),
                        ("layers['5']", {"layers": {"5": {"window": 2**70}}}),
                        ("sites['a.b']", {"sites": {"a.b": {"gamma": 2**70}}}),
                        ("layers['0']", {"layers": {"0": {"launch": {"block_m": 2**70}}}})):
        with pytest.raises(ValueError, match=rf"^{re.escape(where)}: .*too large"):
            DeltaConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"too large"):
        SiteConfig(sink=2**70)


# ---- JSON text or file -------------------------------------------------------------------------------

def test_from_json_tells_text_from_files(tmp_path, monkeypatch):
    config = _random_config(random.Random())
    monkeypatch.chdir(tmp_path)
    Path("{odd name}.json").write_text(config.to_json())      # a file whose name starts like JSON
    assert DeltaConfig.from_json("{odd name}.json") == config
    assert DeltaConfig.from_json(Path("{odd name}.json")) == config
    assert DeltaConfig.from_json(str(tmp_path / "{odd name}.json")) == config
    assert DeltaConfig.from_json("\n  " + config.to_json()) == config
    assert DeltaConfig.from_file("{odd name}.json") == config
    assert DeltaConfig.from_text(config.to_json()) == config
    with pytest.raises(ValueError, match=r"config 'missing\.json' is neither JSON text \(.*\) nor an existing file"):
        DeltaConfig.from_json("missing.json")
    with pytest.raises(ValueError, match=r"is neither JSON text .* nor an existing file"):
        DeltaConfig.from_json("x" * 5000)                      # too long for a file name: no OSError leaks
    with pytest.raises(ValueError, match=r"cannot read config file 'missing\.json'"):
        DeltaConfig.from_file("missing.json")
    with pytest.raises(ValueError, match=r"cannot read config file"):
        DeltaConfig.from_json(Path("missing.json"))           # a Path is always a file
    Path("bad.json").write_text('{"layers": {"-1": {}}}')
    with pytest.raises(ValueError, match=r"config file 'bad\.json': layers keys must be layer indices >= 0"):
        DeltaConfig.from_json("bad.json")
    Path("binary.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"cannot read config file 'binary\.json'"):
        DeltaConfig.from_json("binary.json")
    with pytest.raises(ValueError, match=r"config is not valid JSON"):
        DeltaConfig.from_text("{oops")
    with pytest.raises(ValueError, match=r"config must be JSON text or a file path, got an object"):
        DeltaConfig.from_json({"default": {}})


def test_json_round_trip_with_layer_and_site_overrides(tmp_path):
    rng = random.Random()
    for i in range(5):
        config = _random_config(rng)
        assert DeltaConfig.from_json(config.to_json()) == config
        path = tmp_path / f"c{i}.json"
        assert config.to_json(path) == path.read_text()
        assert DeltaConfig.from_json(path) == config == DeltaConfig.from_file(str(path))
        assert DeltaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        for name, site in config.sites.items():
            assert config.for_site(name, None) == site
        for layer, site in config.layers.items():
            assert config.for_site("not.an.override", layer) == site


def test_partial_overrides_inherit_the_default():
    config = DeltaConfig.from_dict({"default": {"window": 512, "launch": {"block_m": 32}},
                                    "layers": {"2": {"gamma": 16}}, "sites": {"s": {"correction": "none"}}})
    assert config.layers[2] == SiteConfig(window=512, gamma=16, launch={"block_m": 32})
    assert config.sites["s"] == SiteConfig(window=512, correction="none", launch={"block_m": 32})
    assert DeltaConfig.from_json(config.to_json()) == config


def test_a_config_keeps_its_own_launch_dict():
    launch = {"block_m": 64}
    site = SiteConfig(launch=launch)
    launch["block_m"] = 24                                     # invalid, and not the config's business
    assert site.launch == {"block_m": 64}


# ---- overrides that match nothing --------------------------------------------------------------------

def test_unmatched_overrides_are_described():
    names = [f"model.layers.{i}.self_attn" for i in range(7)]
    config = DeltaConfig(sites={"model.layers.3.self_attn": SiteConfig(),
                                "model.layers.3.self_atn": SiteConfig(),
                                "encoder.block.1": SiteConfig()},
                         layers={0: SiteConfig(), 6: SiteConfig(), 7: SiteConfig(), 40: SiteConfig()})
    found = config.unmatched(names, list(range(7)))
    assert found == [
        "sites['encoder.block.1'] matches no attention site of the model",
        "sites['model.layers.3.self_atn'] matches no attention site of the model "
        "(did you mean 'model.layers.3.self_attn'?)",
        "layers['7'] matches no attention layer of the model (its layers: 0..6)",
        "layers['40'] matches no attention layer of the model (its layers: 0..6)",
    ]
    assert config.unmatched(names + ["model.layers.3.self_atn", "encoder.block.1"], list(range(41))) == []
    assert DeltaConfig(layers={1: SiteConfig()}).unmatched([], [0, 2, 5]) == \
        ["layers['1'] matches no attention layer of the model (its layers: 0, 2, 5)"]
    assert DeltaConfig(layers={3: SiteConfig()}).unmatched(["lm.attn"], [None, 0, 1]) == \
        ["layers['3'] matches no attention layer of the model (its layers: 0..1)"]
    assert DeltaConfig().unmatched([], []) == []


# ---- bounded, strict JSON ----------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
DUPLICATE_LAYER = '{"layers": {"1": {"gamma": 8}, "1": {"gamma": 16}}}'


def test_deep_json_is_a_value_error_naming_the_config(tmp_path):
    """Python's json recurses once per level: this was a RecursionError."""
    for parse in (DeltaConfig.from_json, DeltaConfig.from_text):
        with pytest.raises(ValueError, match=r"^config nests JSON deeper than 64 levels"):
            parse(DEEP)
    inner = "[" * 64 + "]" * 64                                  # the limit itself parses (and is no config)
    with pytest.raises(ValueError, match=r"config must be an object .* got a list"):
        DeltaConfig.from_json(inner)
    with pytest.raises(ValueError, match=r"deeper than 64 levels"):
        DeltaConfig.from_json("[" + inner + "]")
    # Brackets inside strings are no nesting.
    assert DeltaConfig.from_json('{"sites": {"a[{\\"[[": {"gamma": 3}}}').sites['a[{"[['].gamma == 3
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(ValueError, match=rf"^config file {re.escape(repr(str(path)))}: config nests JSON deeper"):
        DeltaConfig.from_json(str(path))


def test_duplicate_keys_and_absurd_integers_are_errors(tmp_path):
    """A repeated key kept the last value silently; a 5000-digit integer was json's ValueError about
    sys.set_int_max_str_digits."""
    with pytest.raises(ValueError, match=r"^config: duplicate key '1' in one JSON object"):
        DeltaConfig.from_json(DUPLICATE_LAYER)
    with pytest.raises(ValueError, match=r"duplicate key 'gamma'"):
        DeltaConfig.from_text('{"default": {"gamma": 8, "gamma": 16}}')
    path = tmp_path / "twice.json"
    path.write_text(DUPLICATE_LAYER)
    with pytest.raises(ValueError, match=r"config file .*twice\.json': config: duplicate key '1'"):
        DeltaConfig.from_file(path)
    with pytest.raises(ValueError, match=r"^config: a JSON integer of 5000 digits; integers here have at most 100"):
        DeltaConfig.from_json('{"default": {"gamma": ' + "9" * 5000 + "}}")
    with pytest.raises(ValueError, match=r"gamma must be <= 2\*\*31 - 1"):      # long, not absurd: validation names it
        DeltaConfig.from_json('{"default": {"gamma": ' + "9" * 30 + "}}")


def test_config_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(deltapass.bounded_json, "MAX_JSON_BYTES", 40)
    path = tmp_path / "big.json"
    path.write_text(DeltaConfig().to_json())
    with pytest.raises(ValueError, match=r"cannot read config file .*big\.json': larger than 40 bytes"):
        DeltaConfig.from_file(path)
    with pytest.raises(ValueError, match=r"^config is \d+ characters long; JSON here is limited to 40"):
        DeltaConfig.from_text(DeltaConfig().to_json())


def test_a_config_read_from_a_pipe(tmp_path):
    """A file the user names is read whatever it is, so `--config <(...)` (a pipe) keeps working."""
    config = DeltaConfig(default=SiteConfig(sink=8, window=24, gamma=12))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, config.to_json().encode())
        os.close(write_end)
        assert DeltaConfig.from_file(f"/dev/fd/{read_end}") == config
    finally:
        os.close(read_end)
