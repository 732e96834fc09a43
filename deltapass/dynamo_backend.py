"""The "delta" torch.compile backend: swap causal self-attention for the Δ op, hand the rest to Inductor."""
from __future__ import annotations

import logging
from typing import Callable

import torch.fx as fx

from .cache import HardwareKey, TunedConfigCache, model_fingerprint, query_tokens, signature_from_sites
from .config import DeltaConfig
from .rewrite import rewrite_graph
from .sites import Site, find_sites

log = logging.getLogger("deltapass.backend")


class DeltaBackend:
    """A torch.compile backend; build it once and reuse it: `torch.compile(m, backend=b)`.

    With an explicit config every graph uses it. Without one, each graph looks up the tuned
    config for its device, attention signature and length in `cache` (True: the default
    TunedConfigCache; False/None: none) and falls back to `fallback` (default: the paper's config).
    """

    def __init__(self, config: DeltaConfig | None = None, inner: str | Callable = "inductor",
                 cache: TunedConfigCache | None | bool = True, fallback: DeltaConfig | None = None) -> None:
        if not (cache is None or isinstance(cache, (bool, TunedConfigCache))):
            raise ValueError(f"cache must be a TunedConfigCache, True, False or None, got cache={cache!r}")
        self.config = config
        self.fallback = fallback if fallback is not None else DeltaConfig()   # no tuned entry: this
        self.inner = inner
        self.cache = TunedConfigCache() if cache is True else (cache or None)
        self.last_sites: list = []
        self.last_config: DeltaConfig | None = None      # what the last graph was rewritten with
        self.last_cache_path = None                       # the entry file it came from, if any

    def __call__(self, gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                 options: dict | None = None) -> Callable:
        """`mode` and `options` are torch.compile's (e.g. mode="reduce-overhead" for CUDA graphs); they go to Inductor."""
        inner = self._inner_compiler(mode, options)   # bad mode/options fail here, before any rewriting
        graph = gm
        try:
            rewritten = fx.GraphModule(gm, _copy_graph(gm.graph))
            sites = find_sites(rewritten.graph)      # read once: they pick the tuned config, then get rewritten
            self.last_config = self._config_for(sites)
            self.last_sites = rewrite_graph(rewritten, self.last_config, sites)
            graph = rewritten
            replaced = sum(s.replaceable for s in self.last_sites)
            log.info("deltapass: %d of %d attention sites use the Δ op", replaced, len(self.last_sites))
        except Exception as exc:  # the user's model must still compile
            log.warning("deltapass: the attention pass failed (%s: %s); compiling this graph untouched",
                        type(exc).__name__, exc)
        return inner(graph, example_inputs)

    @property
    def _fallback_name(self) -> str:
        return "paper defaults" if self.fallback == DeltaConfig() else "fallback config"

    def _config_for(self, sites: list[Site]) -> DeltaConfig:
        """The user's config, else the cached tuned config for this graph, else the fallback."""
        self.last_cache_path = None
        if self.config is not None:
            return self.config
        if self.cache is None or not any(s.replaceable for s in sites):
            return self.fallback
        try:
            fingerprint = model_fingerprint(signature_from_sites(sites))
            query = next(s.query for s in sites if s.replaceable)
            device = query.meta.get("example_value", query.meta.get("val")).device
            n_tokens = query_tokens(sites)
            found = self.cache.resolve(HardwareKey.current(device), fingerprint, n_tokens)
        except Exception as exc:  # a broken cache costs speed, never the compile
            log.warning("deltapass: tuned-config lookup failed (%s: %s); using the %s",
                        type(exc).__name__, exc, self._fallback_name)
            return self.fallback
        if found.entry is None:
            log.info("deltapass: using the %s for %d tokens: %s", self._fallback_name, n_tokens, found.reason)
            return self.fallback
        self.last_cache_path = found.path
        log.info("deltapass: using tuned config %s (bucket %d) for %d tokens",
                 found.path, found.entry.bucket, n_tokens)
        return found.entry.config

    def _inner_compiler(self, mode: str | None, options: dict | None) -> Callable:
        """The backend that compiles the rewritten graph; torch.compile's mode/options apply to Inductor only."""
        from torch._dynamo.backends.registry import lookup_backend

        inductor_settings = (mode is not None and mode != "default") or bool(options)
        if inductor_settings and self.inner != "inductor":
            raise ValueError(f"mode={mode!r} and options={options!r} are Inductor settings, but this backend "
                             f"compiles with inner={self.inner!r}; use inner='inductor' or leave them unset")
        if inductor_settings:
            return _inductor_with(mode, options)
        return self.inner if callable(self.inner) else lookup_backend(self.inner)


def _inductor_with(mode: str | None, options: dict | None) -> Callable:
    """Inductor with torch.compile's mode and options applied exactly as torch.compile applies them."""
    import torch

    if mode is not None and not isinstance(mode, str):
        raise ValueError(f"mode must be a string such as 'reduce-overhead', got mode={mode!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict of Inductor config values, got options={options!r}")
    try:
        return torch._TorchCompileInductorWrapper(mode, dict(options or {}), None)
    except RuntimeError as exc:   # torch names the unknown mode or option; say which argument carried it
        raise ValueError(f"Inductor rejected mode={mode!r} / options={options!r}: {exc}") from exc


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy (metadata shared) so a failed rewrite leaves the original graph intact."""
    new = fx.Graph()
    new._codegen = graph._codegen
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


def backend(config: DeltaConfig | None = None, inner: str | Callable = "inductor",
            cache: TunedConfigCache | None | bool = True, fallback: DeltaConfig | None = None) -> DeltaBackend:
    """The configurable form: `torch.compile(model, backend=deltapass.backend(config))`."""
    return DeltaBackend(config, inner, cache, fallback)


def delta_backend(gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                  options: dict | None = None) -> Callable:
    """Entry point of `torch.compile(model, backend="delta")`: the tuned config from the cache, else the defaults.

    torch.compile's `mode` and `options` reach Inductor: `torch.compile(model, backend="delta",
    mode="reduce-overhead")` runs the rewritten model under CUDA graphs.
    """
    return _DEFAULT(gm, example_inputs, mode=mode, options=options)


_DEFAULT = DeltaBackend()
