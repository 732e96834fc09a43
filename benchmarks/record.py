"""What every benchmark JSON records about its run, under its "meta" key: one header for all scripts.

    {"meta": {"script", "argv", "date", "device", "torch", "triton", "python", "kernels_revision", "commit", ...
              the script's own fields (shape, config, ...)},
     ...the script's results ("timings", "checks", "runs", "cases")}

`kernels_revision` is deltapass.kernels.dispatch.KERNELS_REVISION (what the tuned-config cache keys on), and
`commit` the checkout's git commit, with "+dirty" when the tree differs from it (None outside a checkout).
"""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

from deltapass.kernels.dispatch import KERNELS_REVISION

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def header(device: str = "cuda", **fields) -> dict:
    """The run's header; `device` is the torch device the script runs on, `fields` the script's own."""
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else str(device)
    return {"script": Path(sys.argv[0]).name, "argv": sys.argv[1:], "date": datetime.now(timezone.utc).isoformat(),
            "device": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "kernels_revision": KERNELS_REVISION, "commit": git_commit(),
            **fields}
