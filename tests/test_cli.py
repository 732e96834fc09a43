"""The `deltapass` command line: help without heavy imports, the search-extra message, `show`, `accuracy`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deltapass import DeltaConfig, SiteConfig
from deltapass.cache import CacheEntry, HardwareKey, TunedConfigCache
from deltapass.fingerprint import model_fingerprint
from deltapass.cli import NEEDS_SEARCH_EXTRA, SUMMARIES, build_parser, main, report_dir

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optuna", "matplotlib")

# Loads deltapass/cli.py without running deltapass/__init__.py, to see what the CLI itself imports.
CLI_ALONE = """
import sys, types
package = types.ModuleType("deltapass")
package.__path__ = [{package_dir!r}]
sys.modules["deltapass"] = package
from deltapass.cli import SUMMARIES, build_parser, main, report_dir
for argv in (["--help"], *([name, "--help"] for name in SUMMARIES)):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r})))
"""


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_module_imports_nothing_heavy_for_help():
    run = run_python(CLI_ALONE.format(package_dir=str(ROOT / "deltapass"), heavy=HEAVY))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-2000:]


def test_entry_point_help_does_not_import_torch():
    run = run_python("import sys\nfrom deltapass.cli import main\ntry:\n    main(['--help'])\n"
                     "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_every_command_runs_a_function_and_the_table_is_fixed():
    from deltapass.cli import COMMANDS

    assert list(COMMANDS) == list(SUMMARIES) and all(callable(f) for f in COMMANDS.values())
    with pytest.raises(TypeError):
        COMMANDS["explain"] = print


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Library code logs" not in out
    for name, summary in SUMMARIES.items():
        assert f"  {name}" in out and summary in out, name


@pytest.mark.parametrize("name", sorted(SUMMARIES))
def test_subcommand_help_has_a_description_and_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert SUMMARIES[name][1:] in out                                  # the description
    if name in NEEDS_SEARCH_EXTRA:                                     # the commands that load a model
        assert "(default: auto)" in out                                # --device, resolved when it runs
        assert "--model MODEL" in out and "embedded SmolLM2" in out


def test_option_helps_state_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    from deltapass import presets

    for default in ("(default: 8192)", "(default: 64)", "(default: 0.1)",
                    f"(default: {presets.RETRIEVAL_TARGET})", f"(default: {presets.MAX_LOSS_DELTA})"):
        assert default in out, default


@pytest.mark.parametrize("command", ["tune", "explain"])
def test_commands_name_the_search_extra_when_it_is_missing(command, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)              # what find_spec sees when it is not installed
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert f"deltapass {command} needs the search extra" in err
    assert "optuna" in err and "pip install 'deltapass[search]'" in err


def test_log_lines_carry_one_prefix_and_the_chosen_level(tmp_path):
    script = ("import logging\nfrom deltapass.cli import main\nmain(['--log-level', 'info', 'show'])\n"
              "logging.getLogger('deltapass.backend').info('using the fallback config')\n"
              "logging.getLogger('deltapass.backend').debug('hidden')\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "DELTAPASS_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == ["deltapass.backend: using the fallback config"]


# ---- show ------------------------------------------------------------------------------------------

def tuned_entry() -> CacheEntry:
    rule = SiteConfig(sink=64, window=256, gamma=64)
    layers = {i: SiteConfig(correction="dense") for i in range(10)}
    layers |= {i: rule for i in range(10, 29)} | {29: SiteConfig(sink=32, window=768, gamma=16,
                                                                  correction="recompute")}
    return CacheEntry(hardware=HardwareKey.current("cpu"), fingerprint=model_fingerprint([("m", 9, 3, 64)]),
                      bucket=8192, config=DeltaConfig(default=rule, layers=layers),
                      meta={"model": "SmolLM2", "study": "s", "values": {"latency_ms": 2769.304957500026,
                                                                        "retrieval": 0.9166666666666666}})


def test_show_summarises_layers_with_plurals_and_rounded_values(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    assert main(["show"]) == 0
    assert "(0 entries)" in capsys.readouterr().out

    TunedConfigCache(tmp_path).save(tuned_entry())
    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert "(1 entry)" in out and "30 overrides" in out
    assert "layers: 0-9 dense, 10-28 delta s64+w256 g64, 29 recompute s32+w768 g16" in out
    assert "latency_ms 2769," in out and "retrieval 0.9167" in out and "2769.30" not in out

    (tmp_path / "configs" / "broken--0123456789abcdef--n4096.json").write_text("{")
    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert "(2 entries)" in out and "corrupt" in out


# ---- accuracy --------------------------------------------------------------------------------------

def test_accuracy_reports_go_to_the_cache_dir_unless_out_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert report_dir(None) == tmp_path / "cache" / "reports"
    assert report_dir("mine") == Path("mine")
    parsed = build_parser().parse_args(["accuracy"])
    assert parsed.out is None and parsed.device == "auto"


# ---- user errors: one line, exit code 2, before any model loads ---------------------------------------

BAD_ARGUMENTS = [
    (["tune", "--trials", "0"], "argument --trials: must be >= 1, got 0"),
    (["tune", "--trials", "-3"], "argument --trials: must be >= 1, got -3"),
    (["tune", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["tune", "--length", "0"], "argument --length: must be >= 1, got 0"),
    (["tune", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["tune", "--context", "-1"], "argument --context: must be >= 1, got -1"),
    (["tune", "--trials", "2.5"], "argument --trials: must be an integer, got '2.5'"),
    (["tune", "--min-retrieval", "nan"], "argument --min-retrieval: must be a finite number, got 'nan'"),
    (["tune", "--min-retrieval", "-0.5"], "argument --min-retrieval: must be >= 0, got -0.5"),
    (["tune", "--max-loss-delta", "inf"], "argument --max-loss-delta: must be a finite number, got 'inf'"),
    (["tune", "--max-window-density", "0"], "argument --max-window-density: must be > 0, got 0"),
    (["tune", "--max-window-density", "1.5"], "argument --max-window-density: must be <= 1, got 1.5"),
    (["tune", "--timeout", "-1"], "argument --timeout: must be > 0, got -1"),
    (["tune", "--timeout", "nan"], "argument --timeout: must be a finite number, got 'nan'"),
    (["tune", "--study", "a/b"], "argument --study: must be 1-200 letters"),
    (["tune", "--study", "../../ESCAPED"], "argument --study: must be 1-200 letters"),
    (["tune", "--study", ".hidden"], "argument --study: must be 1-200 letters"),
    (["tune", "--study", "a..b"], "argument --study: must be 1-200 letters"),
    (["accuracy", "--lengths", "1024", "0"], "argument --lengths: must be >= 1, got 0"),
    (["accuracy", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["accuracy", "--name", "../report"], "argument --name: must be 1-200 letters"),
    (["explain", "--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["bench", "--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
]


@pytest.fixture
def no_model_loads(tmp_path, monkeypatch):
    """A cache dir of its own, and a load_model that fails the test: the checks come before any model."""
    from deltapass.search import models

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_exit_2_before_the_model_loads(argv, message, no_model_loads, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deltapass {argv[0]}: error: {message}"), err
    assert sorted(p.name for p in no_model_loads.rglob("*")) == [], "nothing is written"


def test_a_missing_journal_folder_is_one_line_before_the_model_loads(no_model_loads, capsys):
    journal = no_model_loads / "no_such_dir" / "journal.log"
    assert main(["tune", "--device", "cpu", "--storage", str(journal)]) == 2
    err = capsys.readouterr().err
    assert err == f"deltapass tune: error: cannot open storage={str(journal)!r}: the folder " \
                  f"{str(journal.parent)!r} does not exist (create it first)\n"
    assert not journal.parent.exists()


def test_a_user_error_is_one_line_and_debug_shows_its_traceback(tmp_path):
    config = tmp_path / "broken.json"
    config.write_text('{"default": {"sink": -4}}')
    env = {**__import__("os").environ, "DELTAPASS_CACHE_DIR": str(tmp_path)}
    for level in ("WARNING", "DEBUG"):
        run = subprocess.run([sys.executable, "-m", "deltapass.cli", "--log-level", level, "explain", "--device",
                              "cpu", "--model", str(tmp_path / "missing"), "--config", str(config)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 2, run.stderr[-3000:]
        *trace, last = run.stderr.strip().splitlines()
        assert last.startswith(f"deltapass explain: error: config file {str(config)!r}: ") and "sink" in last, last
        if level == "DEBUG":
            assert trace and trace[0] == "Traceback (most recent call last):", run.stderr[-3000:]
        else:
            assert trace == [], run.stderr[-3000:]


def test_ctrl_c_in_tune_says_progress_is_saved_and_exits_130(no_model_loads, monkeypatch, capsys):
    import deltapass.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    journal = no_model_loads / "journal.log"
    assert main(["tune", "--device", "cpu", "--cpu-smoke", "--storage", str(journal)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"deltapass tune: interrupted; the study's finished trials are saved in {journal}: run the same command "
        "again to resume"), err


@pytest.mark.parametrize("device", ["cpu", "cpu:0", "auto"])
def test_tune_on_a_cpu_says_it_is_a_gpu_job_before_the_model_loads(device, no_model_loads, monkeypatch, capsys):
    import deltapass.cli as cli

    monkeypatch.setattr(cli, "_resolve_device", lambda device: "cpu" if device == "auto" else device)  # no GPU here
    assert main(["tune", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltapass tune: error: tuning is a GPU job: "), err
    assert "--device cuda" in err and "deltapass tune --device cpu --cpu-smoke --length 1024" in err
    assert sorted(p.name for p in (no_model_loads / "cache").rglob("*") if p.is_file()) == [], "nothing is written"


def test_cpu_smoke_runs_tune_on_a_cpu(no_model_loads, monkeypatch):
    import deltapass.cli as cli

    loaded = []
    monkeypatch.setattr(cli, "_load", lambda args: loaded.append(args.device) or (_ for _ in ()).throw(
        ValueError("stop after the load")))
    assert main(["tune", "--device", "cpu", "--cpu-smoke"]) == 2
    assert loaded == ["cpu"]


@pytest.mark.parametrize("command", ["explain", "tune", "bench", "show"])
def test_each_commands_usage_line_names_the_command(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: deltapass {command} [-h]")


def test_bench_gives_a_ratio_only_outside_the_spread_of_the_runs():
    from deltapass.cli import _versus
    from deltapass.search.harness import Latency

    dense = Latency(100.0, 90.0, 110.0, 20, True)
    assert _versus(dense, dense) == "(baseline)"
    assert _versus(Latency(46.3, 30.0, 95.0, 20, True), dense) == "no difference from all-dense (the spreads overlap)"
    assert _versus(Latency(50.0, 45.0, 55.0, 20, True), dense) == " 2.00x all-dense"
    assert _versus(Latency(200.0, 150.0, 250.0, 20, True), dense) == " 0.50x all-dense"


def test_explain_says_why_nothing_changes_when_no_site_takes_delta(tmp_path, monkeypatch, capsys):
    """At a length the config's sink + window covers, explain ends with one line that says so."""
    import deltapass.cli as cli
    from tiny_llama import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "tiny")
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    assert main(["explain", "--model", str(folder), "--device", "cpu", "--tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == ("nothing changes at 100 tokens: sink + window (3072) covers all 100 "
                                            "tokens: exact SDPA is_causal; a longer --tokens shows the Δ op"), out
    assert cli.build_parser().parse_args(["explain"]).tokens == 8192


# ---- several lengths in one job ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--length", "1024", "--lengths", "2048", "4096"], "give --length or --lengths, not both, got --length 1024 "
                                                        "and --lengths 2048 4096"),
    (["--lengths", "16384", "12000"], "lengths 16384 and 12000 share the cache bucket 16384"),
])
def test_tune_lengths_errors_come_before_the_model_loads(argv, message, no_model_loads, capsys):
    assert main(["tune", "--device", "cpu", "--cpu-smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deltapass tune: error: {message}"), err


def test_tune_lengths_runs_one_job_per_length_on_one_model_and_one_search_engine(no_model_loads, monkeypatch):
    import deltapass.cli as cli
    from deltapass.search import tune

    loads, engines, jobs, reports = [], [], [], []
    monkeypatch.setattr(cli, "_load", lambda args: loads.append(args.device) or "LOADED")
    monkeypatch.setattr(tune, "CompiledModel",
                        lambda loaded, **kw: engines.append((loaded, kw)) or f"ENGINE{len(engines)}")

    def job(loaded, settings, *, cache=None, progress=True, model=None, label=""):
        jobs.append((loaded, settings.length, settings.study, model, label))
        return f"RESULT {settings.length}"

    monkeypatch.setattr(tune, "tune", job)
    monkeypatch.setattr(cli, "_report_tune", lambda args, loaded, length, result: reports.append((length, result)))
    assert main(["tune", "--device", "cpu", "--cpu-smoke", "--lengths", "16384", "32768", "2048",
                 "--study", "s"]) == 0
    assert loads == ["cpu"] and engines == [("LOADED", {"switched": True})]
    assert jobs == [("LOADED", 16384, "s-n16384", "ENGINE1", "[1/3: 16384 tokens] "),
                    ("LOADED", 32768, "s-n32768", "ENGINE1", "[2/3: 32768 tokens] "),
                    ("LOADED", 2048, "s-n2048", "ENGINE1", "[3/3: 2048 tokens] ")]
    assert reports == [(n, f"RESULT {n}") for n in (16384, 32768, 2048)]
    jobs.clear()
    assert main(["tune", "--device", "cpu", "--cpu-smoke", "--study", "s"]) == 0        # --length's default
    assert jobs == [("LOADED", 8192, "s", "ENGINE2", "")]


# ---- sharing entries: export and import ---------------------------------------------------------------

def test_export_then_import_round_trips_an_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "team"))
    monkeypatch.chdir(tmp_path)
    saved = TunedConfigCache(tmp_path / "team").save(tuned_entry())
    assert main(["export", saved.name, "shared.json"]) == 0
    assert capsys.readouterr().out.startswith(f"exported {saved} to shared.json")
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "mine"))
    assert main(["import", "shared.json"]) == 0
    assert capsys.readouterr().out == f"imported {tmp_path / 'mine' / 'configs' / saved.name}: ok\n"
    assert (tmp_path / "mine" / "configs" / saved.name).read_bytes() == saved.read_bytes()
    [(path, entry, status)] = TunedConfigCache(tmp_path / "mine").entries()
    assert status == "ok" and entry.to_dict() == tuned_entry().to_dict()
    assert main(["import", "shared.json"]) == 0
    assert capsys.readouterr().out.startswith("replaced ")


def test_an_entry_for_another_device_imports_and_show_says_so(tmp_path, monkeypatch, capsys):
    import dataclasses

    entry = tuned_entry()
    entry = dataclasses.replace(entry, hardware=dataclasses.replace(entry.hardware, device_name="NVIDIA H200",
                                                                    capability="9.0"))
    (tmp_path / "h200.json").write_text(entry.to_json())
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["import", str(tmp_path / "h200.json")]) == 0
    assert "other device: tuned on NVIDIA H200 (9.0)" in capsys.readouterr().out
    assert main(["show"]) == 0
    out = capsys.readouterr().out
    assert f"  {entry.file_name}: other device: tuned on NVIDIA H200 (9.0); this machine has" in out


CORRUPT_ENTRIES = [
    ("{", "corrupt: bad JSON"),
    ('{"schema": 1, "schema": 1}', "corrupt: entry: duplicate key 'schema'"),
    ("[" * 100 + "]" * 100, "corrupt: entry nests JSON deeper than 64 levels"),
    ('{"schema": 99}', "stale: schema 99, this deltapass reads schema 1"),
    ("BUCKET", "corrupt: bucket must be a power of two >= 1024, got bucket=1000"),
    ("GAMMA", "corrupt: default: gamma must be >= 1, got gamma=0"),
]


@pytest.mark.parametrize("text, message", CORRUPT_ENTRIES, ids=[m for _, m in CORRUPT_ENTRIES])
def test_import_refuses_what_the_cache_would_not_read_in_one_line(text, message, tmp_path, monkeypatch, capsys):
    good = tuned_entry().to_dict()
    if text == "BUCKET":
        text = __import__("json").dumps(good | {"bucket": 1000})
    elif text == "GAMMA":
        text = __import__("json").dumps(good | {"config": {"default": {"gamma": 0}}})
    file = tmp_path / "entry.json"
    file.write_text(text)
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["import", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deltapass import: error: entry file {str(file)!r}: {message}"), err
    assert not (tmp_path / "cache" / "configs").exists() or not any((tmp_path / "cache" / "configs").iterdir())


def test_export_names_the_entries_it_knows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    saved = TunedConfigCache(tmp_path).save(tuned_entry())
    assert main(["export", "../secret.json"]) == 2
    err = capsys.readouterr().err
    assert err == f"deltapass export: error: entry '../secret.json' is not in {tmp_path / 'configs'} " \
                  f"(its entries: {saved.name})\n"
