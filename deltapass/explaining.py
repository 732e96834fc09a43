"""explain(): what torch.compile with the delta backend will do to each attention site of a model, and why.

It traces the call as torch.compile would, in the caller's grad mode, and asks the backend for its
plan: the same function that decides and rewrites at compile time. So the report names the config
the compile will use (given, tuned entry from the cache, or fallback) and each site's action.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .config import DeltaConfig, SiteConfig
from .decision import SiteDecision
from .dynamo_backend import ConfigChoice, DeltaBackend, GraphPlan
from .fingerprint import tensor_meta
from .kernels import LaunchConfig
from .kernels.dispatch import kernels_for
from .sites import Site


@dataclass(frozen=True)
class SiteReport:
    name: str
    layer: int | None
    kind: str
    decision: SiteDecision
    notes: tuple[str, ...] = ()
    kernels: str = ""          # for a site that runs the Δ op: which kernels, and why not the Hopper ones

    @property
    def action(self) -> str:
        return self.decision.action

    @property
    def reason(self) -> str:
        return self.decision.reason

    @property
    def config(self) -> SiteConfig | None:
        return self.decision.config

    @property
    def replaced(self) -> bool:
        """The site runs the Δ op (under a per-call mask check for the *_checked actions)."""
        return self.decision.uses_delta

    @property
    def mask_checked_per_call(self) -> bool:
        return self.decision.mask_checked_per_call


@dataclass
class ExplainReport:
    """Every attention site met while tracing the model, in graph order (graph breaks included)."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs: list[GraphPlan] = field(default_factory=list)

    @property
    def replaced(self) -> list[SiteReport]:
        return [s for s in self.sites if s.replaced]

    @property
    def choice(self) -> ConfigChoice | None:
        """The config of the first graph with attention sites (the model's prefill)."""
        return next((g.choice for g in self.graphs if g.sites), None)

    @property
    def fingerprint(self) -> str | None:
        return next((g.fingerprint for g in self.graphs if g.fingerprint), None)

    def __str__(self) -> str:
        lines = [f"{len(self.sites)} attention site(s) in {len(self.graphs)} graph(s), "
                 f"{len(self.replaced)} use the Δ op"]
        for g in self.graphs:
            if g.tokens is not None:
                lines.append(f"graph of {g.tokens} tokens: {g.choice.describe()}")
                lines += [f"  not applied: {u}" for u in g.unmatched]
        for kernels in dict.fromkeys(s.kernels for s in self.sites if s.kernels):
            lines.append(f"Δ sites run {kernels}")
        rows = [("site", "layer", "kind", "action", "config / reason")]
        rows += [(s.name, "-" if s.layer is None else str(s.layer), s.kind, s.action, s.reason) for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        return "\n".join(lines)


class _Recorder:
    """A backend that plans every graph exactly as `planner` would, records it, and runs the graph as is."""

    def __init__(self, planner: DeltaBackend) -> None:
        self.planner = planner
        self.report = ExplainReport()

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        plan = self.planner.plan(gm, example_inputs)
        self.report.graphs.append(plan)
        for site, decision in zip(plan.sites, plan.decisions):
            self.report.sites.append(SiteReport(site.name, site.layer, site.kind, decision, tuple(site.notes),
                                                _kernels(site, decision)))
        return gm.forward


def _kernels(site: Site, decision: SiteDecision) -> str:
    if not decision.uses_delta:
        return ""
    query = tensor_meta(site.query)
    return kernels_for(query.device, query.dtype, query.shape[-1], LaunchConfig.from_kwargs(decision.config.launch),
                       site.chunk)


def explain(model: torch.nn.Module, *args, config: DeltaConfig | None = None, backend: DeltaBackend | None = None,
            **kwargs) -> ExplainReport:
    """Trace `model(*args, **kwargs)` as torch.compile would and report each attention site's action.

    backend: the backend you compile with (default: the one behind backend="delta", which reads the
    tuned-config cache); config: shorthand for deltapass.backend(config). Runs in the caller's grad
    mode, as the compiled call will: call it under torch.no_grad() if inference runs there.
    """
    if config is not None and backend is not None:
        raise ValueError("give explain() a config or a backend, not both")
    planner = backend if backend is not None else DeltaBackend(config)
    recorder = _Recorder(planner)
    torch.compile(model, backend=recorder)(*args, **kwargs)
    if not recorder.report.graphs:
        # Each explain() traces with its own backend, which Dynamo keeps as one more cache entry on the
        # model's code; past torch._dynamo.config.recompile_limit it stops tracing and runs eagerly.
        raise RuntimeError("explain() saw no graph: Dynamo ran the model without tracing it, most likely because "
                           "this model's code reached torch._dynamo.config.recompile_limit (every explain() or "
                           "torch.compile with a new backend adds a cache entry); torch._dynamo.reset() clears them")
    return recorder.report


def fingerprint(model: torch.nn.Module, *args, **kwargs) -> str:
    """The tuned-config cache's fingerprint of `model`, exactly as the backend computes it at compile time.

    Without inputs, a causal LM's: one prompt of 128 token ids (the fingerprint does not depend on the prompt).
    Call it in the grad mode the model will run in (under torch.no_grad() for inference), as explain().
    """
    if not args and not kwargs:
        args = (torch.zeros(1, 128, dtype=torch.long, device=next(model.parameters()).device),)
    report = explain(model, *args, backend=DeltaBackend(cache=False), **kwargs)
    if report.fingerprint is None:
        raise ValueError("the model has no attention site the pass can replace, so no tuned config applies to it")
    return report.fingerprint
