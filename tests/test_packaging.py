"""One distribution, three parts: the built wheel holds deltapass, deltapass.kernels and deltapass.search."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
