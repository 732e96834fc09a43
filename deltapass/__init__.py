"""deltapass: sparse + Δ-corrected attention for long-context prefill."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltapass")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
