"""One distribution, three parts: the built wheel holds deltapass, deltapass.kernels and deltapass.search;
from a checkout, the folder names do not leak a second copy of the ops."""
from __future__ import annotations

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
import importlib, torch
from torch._library.custom_ops import OPDEF_TO_LIB
if {kernels_first}:
    import kernels                                  # what transformers' probe for the HF package does
from deltapass.kernels import masked, op
from transformers.utils.import_utils import is_kernels_available
is_kernels_available()
import kernels
assert kernels.__all__ == [], kernels.__all__
try:
    importlib.import_module("kernels.op")
    raise SystemExit("kernels.op imported as a second copy")
except ImportError:
    pass
for name, opdef in [("deltapass::delta_attention", op._delta_attention_op),
                    ("deltapass::mask_is_causal", masked._mask_is_causal_op),
                    ("deltapass::delta_attention_masked", masked._delta_attention_masked_op)]:
    assert OPDEF_TO_LIB[name] is opdef._lib, name + " was registered again by a second copy"
q = torch.randn(1, 2, 40, 64)
op.delta_attention(q, q, q, sink=2, window=8, gamma=4)
"""


@pytest.mark.parametrize("kernels_first", [False, True])
def test_top_level_kernels_name_from_a_checkout_does_not_re_register_the_ops(kernels_first):
    """From the repository root `kernels` is importable as a top-level name, and transformers imports
    that name to probe for the Hugging Face kernels package. A second copy of op.py would re-register
    deltapass's ops and leave the first copy calling a freed registration (seen as vector::reserve)."""
    pytest.importorskip("transformers")
    script = REGISTRATIONS_SURVIVE.format(kernels_first=kernels_first)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
