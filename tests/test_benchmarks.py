"""The benchmark suite stays runnable and its published results stay findable.

Every script in benchmarks/ answers --help on the CPU (no GPU, no model, no result written), is listed in
docs/ARCHITECTURE.md, and every repository path the docs cite (results, scripts, modules) exists.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(BENCHMARKS.glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]
# A repository path: a top-level folder, then path characters (a link's text, a backticked name, or prose).
REPO_PATH = re.compile(r"(?<![\w./:-])(?:\.\./)?((?:benchmarks|docs|examples|kernels|deltapass|search|tests)/[\w./+-]*)")
# A markdown link's target, resolved against the file that holds it.
LINK = re.compile(r"\]\(\s*([^)\s#]+)\s*\)")


def scripts() -> list[Path]:
    """The runnable files of benchmarks/: Python with a __main__ block, and shell scripts."""
    return sorted([p for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
                  + list(BENCHMARKS.glob("*.sh")))


def test_every_script_answers_help_on_the_cpu():
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=BENCHMARKS, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
             for p in scripts() if p.suffix == ".py"}
    failed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = f"rc {proc.returncode}: {(out + err)[-600:]}"
    assert not [p.name for p in scripts() if p.suffix != ".py"], "shell scripts in benchmarks/ have no --help check"
    assert not failed, failed


def test_architecture_lists_every_script():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text[text.index("benchmarks/ "):]
    missing = [p.name for p in scripts() + [BENCHMARKS / "shapes.py", BENCHMARKS / "record.py"] if p.name not in section]
    assert not missing, f"docs/ARCHITECTURE.md's benchmarks/ section does not list {missing}"


def cited_paths(doc: Path) -> set[tuple[str, Path]]:
    text = doc.read_text()
    cited = {(m, ROOT / m) for m in (m.rstrip(".") for m in REPO_PATH.findall(text))}
    for target in LINK.findall(text):
        if "://" not in target and not target.startswith("mailto:"):
            cited.add((target, (doc.parent / target).resolve()))
    return cited


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_path_exists(doc):
    missing = sorted(name for name, path in cited_paths(doc) if not path.exists())
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


def test_the_path_check_sees_what_it_must(tmp_path):
    """The check reads backticked, linked and relative paths, and flags a missing one."""
    doc = tmp_path / "DOC.md"
    doc.write_text("see `benchmarks/results/nope.json`, [x](DOC.md), [y](missing/), and kernels/op.py.\n")
    found = {name for name, path in cited_paths(doc) if not path.exists()}
    assert found == {"benchmarks/results/nope.json", "missing/"}


def test_model_shapes_live_in_one_table():
    """benchmarks/shapes.py is the one place a model's sizes are written; the scripts look them up by name."""
    restated = [p.name for p in BENCHMARKS.glob("*.py") if p.name != "shapes.py"
                and re.search(r"num_key_value_heads\s*=|intermediate_size\s*=|\bHQ, HKV, D = \d", p.read_text())]
    assert not restated, f"these scripts restate model shapes instead of reading benchmarks/shapes.py: {restated}"


def test_every_result_records_its_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from record import header

    from deltapass.kernels.dispatch import KERNELS_REVISION

    meta = header("cpu", shape="x")
    assert meta["device"] == "cpu" and meta["shape"] == "x" and meta["kernels_revision"] == KERNELS_REVISION
    assert {"script", "argv", "date", "torch", "triton", "python", "commit"} <= set(meta)
    assert meta["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", meta["commit"])
