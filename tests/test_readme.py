"""Every ```python block of README.md runs as written, on the CPU, in a fresh interpreter.

The blocks keep themselves small on the CPU (a few hundred tokens), so nothing is substituted here.
Each runs from a temporary folder with an empty deltapass cache dir and without TRITON_INTERPRET
(which conftest.py sets for the kernel tests): what a new user on a fresh CPU machine gets.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def test_the_readme_has_python_blocks_and_the_extractor_finds_them():
    sample = "text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == ["x = 1\n", "y = 2\n"]
    assert len(python_blocks(README.read_text())) >= 2


def run_block(index: int, tmp_path) -> subprocess.CompletedProcess:
    block = python_blocks(README.read_text())[index]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", DELTAPASS_CACHE_DIR=str(tmp_path / "cache"))
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"README block {index} failed:\n{block}\n{run.stdout[-2000:]}{run.stderr[-4000:]}"
    return run


@pytest.mark.parametrize("index", range(1, len(python_blocks(README.read_text()))))
def test_readme_python_block_runs(index, tmp_path):
    run_block(index, tmp_path)


def test_the_one_line_block_reports_what_each_config_does_to_the_real_model(tmp_path):
    """Block 0 on the embedded model's 421-token prompt: the paper's config covers it (no site changes, and the
    report says why); the per-site config takes Δ at the 29 layers past layer 0, which stays dense."""
    out = run_block(0, tmp_path).stdout
    counts = [int(n) for n in re.findall(r"30 attention site\(s\) in \d+ graph\(s\), (\d+) use the Δ op", out)]
    assert counts == [0, 29], out[-3000:]
    assert "sink + window (3072) covers all 421 tokens" in out, out[-3000:]


def test_ci_runs_the_readme_test_command():
    bash_lines = [line for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
                  for line in block.splitlines()]
    (test_command,) = [line for line in bash_lines if "pytest" in line]
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci, "README's test command and .ci/run differ"
    assert "-c constraints.txt" in test_command, "the test command must install the tested versions"


def test_constraints_pin_every_dependency_ci_installs():
    """constraints.txt holds one exact version for each of the packages the test extra needs."""
    pins = {}
    for line in (README.parent / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and name not in pins, line
            pins[name.lower().replace("_", "-")] = version
    for needed in ("torch", "triton", "transformers", "optuna", "sqlalchemy", "gguf", "accelerate", "kernels",
                   "numpy", "pytest", "pytest-xdist", "networkx", "platformdirs", "matplotlib", "tqdm"):
        assert needed in pins, needed
    assert pins["torch"] == "2.13.0"
