"""Importing this folder under a name other than deltapass.kernels: hand that name to the installed package."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def import_installed(name: str, init_file: str) -> None:
    """Replace sys.modules[name] (this folder, imported by mistake) by the package `name` found on sys.path
    without the folder that holds this checkout's copy; ModuleNotFoundError when there is none."""
    sys.modules.pop(f"{name}._step_aside", None)     # this helper, imported through the mistaken name
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r} (the checkout's {name}/ is deltapass.{name}, "
                                  f"not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module            # the import statement returns what sys.modules holds after this file
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
