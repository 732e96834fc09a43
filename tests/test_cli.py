"""The `deltapass` command line: help without heavy imports, the search-extra message, `show`, `accuracy`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deltapass import DeltaConfig, SiteConfig
from deltapass.cache import CacheEntry, HardwareKey, TunedConfigCache
from deltapass.fingerprint import model_fingerprint
from deltapass.cli import SUMMARIES, build_parser, main, report_dir

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
    if name != "show":
        assert "(default: auto)" in out                                # --device, resolved when it runs
        assert "--model MODEL" in out and "embedded SmolLM2" in out


def test_option_helps_state_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 8192)", "(default: 64)", "(default: 0.1)",
                    "(default: deltapass.presets.RETRIEVAL_TARGET)"):
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
