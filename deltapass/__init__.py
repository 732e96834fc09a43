"""deltapass: sparse + Δ-corrected attention for long-context prefill.

`torch.compile(model, backend="delta")` swaps every provably causal self-attention
for the Δ op (deltapass.kernels); `deltapass.explain(model, *inputs)` says what it will do;
`deltapass.prefill(model, input_ids, chunk=...)` prefills a long prompt in chunks over a KV cache.
Names load on first use, so `deltapass --help` starts without importing torch.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltapass")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

_EXPORTS = {"DeltaBackend": ".dynamo_backend", "backend": ".dynamo_backend", "DeltaConfig": ".config",
            "SiteConfig": ".config", "ExplainReport": ".explaining", "SiteReport": ".explaining",
            "explain": ".explaining", "prefill": ".chunked_prefill"}
_SUBMODULES = ("presets",)
__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'deltapass' has no attribute {name!r}")
