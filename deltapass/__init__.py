"""deltapass: sparse + Δ-corrected attention for long-context prefill.

`torch.compile(model, backend="delta")` swaps every provably causal self-attention
for the Δ op (deltapass.kernels); `deltapass.explain(model, *inputs)` says what it did.
"""
from importlib.metadata import PackageNotFoundError, version

from .dynamo_backend import DeltaBackend, backend
from .config import DeltaConfig, SiteConfig
from .explain import ExplainReport, SiteReport, explain

try:
    __version__ = version("deltapass")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

__all__ = ["DeltaBackend", "DeltaConfig", "ExplainReport", "SiteConfig", "SiteReport", "backend", "explain"]
