"""The masked Δ op's cases (tests/masked_cases.py), run by pytest in a fresh process.

Why a fresh process: in a pytest process that had first built the RULER tasks (tokenising the
shipped prose with the SmolLM2 tokenizer), the first call of deltapass::delta_attention_masked
sometimes failed inside torch's dispatcher with `ValueError: vector::reserve` (about 1 run in 3;
never in a plain script doing the same, never with the op first). The cause is not found; see the
project notes. Isolating the cases keeps them meaningful and the suite deterministic.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_masked_op_cases_in_a_fresh_process():
    cases = Path(__file__).with_name("masked_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                          str(cases)], cwd=cases.parent.parent, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]
