"""The "delta" torch.compile backend: swap causal self-attention for the Δ op, hand the rest to Inductor."""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx as fx

from .config import DeltaConfig
from .rewrite import rewrite_graph

log = logging.getLogger("deltapass.backend")


class DeltaBackend:
    """A torch.compile backend; build it once with a config and reuse it: `torch.compile(m, backend=b)`."""

    def __init__(self, config: DeltaConfig | None = None, inner: str | Callable = "inductor") -> None:
        self.config = config if config is not None else DeltaConfig()
        self.inner = inner
        self.last_sites: list = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        graph = gm
        try:
            rewritten = fx.GraphModule(gm, _copy_graph(gm.graph))
            self.last_sites = rewrite_graph(rewritten, self.config)
            graph = rewritten
            replaced = sum(s.replaceable for s in self.last_sites)
            log.info("deltapass: %d of %d attention sites use the Δ op", replaced, len(self.last_sites))
        except Exception as exc:  # the user's model must still compile
            log.warning("deltapass: the attention pass failed (%s: %s); compiling this graph untouched",
                        type(exc).__name__, exc)
        return self._compile_inner(graph, example_inputs)

    def _compile_inner(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if callable(self.inner):
            return self.inner(gm, example_inputs)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)(gm, example_inputs)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy (metadata shared) so a failed rewrite leaves the original graph intact."""
    new = fx.Graph()
    new._codegen = graph._codegen
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


def backend(config: DeltaConfig | None = None, inner: str | Callable = "inductor") -> DeltaBackend:
    """The configurable form: `torch.compile(model, backend=deltapass.backend(config))`."""
    return DeltaBackend(config, inner)


def delta_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """Entry point of `torch.compile(model, backend="delta")` with the default config."""
    return _DEFAULT(gm, example_inputs)


_DEFAULT = DeltaBackend()
