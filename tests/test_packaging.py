"""One distribution, three parts: the built wheel holds deltapass, deltapass.kernels and deltapass.search;
from a checkout, the folder names do not leak a second copy of the ops."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_three_parts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = tmp_path.glob("deltapass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("deltapass/__init__.py", "deltapass/kernels/__init__.py", "deltapass/kernels/triton_delta.py",
                 "deltapass/search/__init__.py"):
        assert part in names, part
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"deltapass"}, top_level


REGISTRATIONS_SURVIVE = """
import importlib, sys, torch
from pathlib import Path
from torch._library.custom_ops import OPDEF_TO_LIB
if {kernels_first}:
    try:
        import kernels                              # what transformers' probe for the HF package does
    except ModuleNotFoundError:
        pass
from deltapass.kernels import masked, op
import transformers.integrations.hub_kernels        # imports Hugging Face's `kernels` when it is installed
from transformers import LlamaForCausalLM
checkout = Path.cwd().resolve()
for name in ("kernels", "kernels.op", "search"):
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin and checkout / name.split(".")[0] in Path(origin).resolve().parents:
        raise SystemExit(name + " resolved to the checkout: " + origin)
for name, opdef in [("deltapass::delta_attention", op._delta_attention_op),
                    ("deltapass::mask_is_causal", masked._mask_is_causal_op),
                    ("deltapass::delta_attention_masked", masked._delta_attention_masked_op)]:
    assert OPDEF_TO_LIB[name] is opdef._lib, name + " was registered again by a second copy"
q = torch.randn(1, 2, 40, 64)
op.delta_attention(q, q, q, sink=2, window=8, gamma=4)
"""


@pytest.mark.parametrize("kernels_first", [False, True])
def test_checkout_root_on_sys_path_shadows_no_installed_package(kernels_first):
    """From the repository root (`python -m pytest`, `python -c`, a prompt) `kernels/` is importable as a
    top-level name, the import name of Hugging Face's kernels package, which transformers >= 5.25 imports.
    That name must reach the installed package, never this folder, and deltapass's ops must stay registered
    once (a second copy of op.py would leave the first calling a freed registration)."""
    pytest.importorskip("transformers")
    script = REGISTRATIONS_SURVIVE.format(kernels_first=kernels_first)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.parametrize("name", ["kernels", "search"])
def test_folder_names_step_aside_for_an_installed_package(tmp_path, name):
    """Whatever is installed under a folder's name wins over the checkout's folder; with nothing installed
    the name is missing, not a second copy of deltapass's code."""
    stand_in = tmp_path / name
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("WHO = 'installed'\n")
    (stand_in / "sub.py").write_text("WHO = 'installed sub'\n")
    script = (f"import {name}, {name}.sub, sys\n"
              f"assert {name}.WHO == 'installed' and {name}.sub.WHO == 'installed sub', {name}.__file__\n"
              f"assert '{name}._step_aside' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_folder_name_with_nothing_installed_is_missing_not_a_second_copy():
    """Without site-packages (-S) nothing else is called `kernels`: importing it from the root fails."""
    run = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "No module named 'kernels'" in run.stderr, run.stderr[-2000:]
