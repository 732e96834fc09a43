"""The task builder's cases (tests/tasks_cases.py), run by pytest in a fresh process.

Why: after the SmolLM2 GGUF tokenizer had been loaded and used in a pytest process, later calls
through torch's dispatcher in that process (custom ops, compiled graphs) sometimes failed with
`ValueError: vector::reserve`. The cause is not found (see the project notes); tests that load
that tokenizer run in their own processes so the rest of the suite stays deterministic.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_task_cases_in_a_fresh_process():
    cases = Path(__file__).with_name("tasks_cases.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                          str(cases)], cwd=cases.parent.parent, env=dict(os.environ), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]
