"""explain(): which attention sites the pass finds in a model, which it replaces, and why not."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .config import DeltaConfig, SiteConfig
from .sites import find_sites


@dataclass(frozen=True)
class SiteReport:
    name: str
    layer: int | None
    kind: str
    replaced: bool
    reason: str
    config: SiteConfig | None
    notes: tuple[str, ...] = ()
    mask_checked_per_call: bool = False     # the mask comes from the inputs: Δ only when it is exactly causal


@dataclass
class ExplainReport:
    """Every attention site met while tracing the model, in graph order (graph breaks included)."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0

    @property
    def replaced(self) -> list[SiteReport]:
        return [s for s in self.sites if s.replaced]

    def __str__(self) -> str:
        head = f"{len(self.sites)} attention site(s) in {self.graphs} graph(s), {len(self.replaced)} use the Δ op"
        rows = [("site", "layer", "kind", "Δ", "config / reason")]
        for s in self.sites:
            if s.replaced:
                c = s.config
                detail = f"{c.correction} sink={c.sink} window={c.window} gamma={c.gamma}"
                if s.mask_checked_per_call:
                    detail += " (when the input mask is causal)"
            else:
                detail = s.reason
            rows.append((s.name, "-" if s.layer is None else str(s.layer), s.kind, "yes" if s.replaced else "no",
                         detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head] + ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        return "\n".join(lines)


class _Recorder:
    """A backend that judges every site like the delta backend would, records it, and runs the graph as is."""

    def __init__(self, config: DeltaConfig) -> None:
        self.config = config
        self.report = ExplainReport()

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        self.report.graphs += 1
        for site in find_sites(gm.graph):
            config = self.config.for_site(site.name, site.layer)
            replaced, reason = site.replaceable, site.reason
            if replaced and config.correction == "dense":
                replaced, reason = False, "configured dense (correction='dense')"
            self.report.sites.append(SiteReport(site.name, site.layer, site.kind, replaced, reason,
                                                config if replaced else None, tuple(site.notes),
                                                replaced and site.runtime_mask is not None))
        return gm.forward


def explain(model: torch.nn.Module, *args, config: DeltaConfig | None = None, **kwargs) -> ExplainReport:
    """Trace `model(*args, **kwargs)` as torch.compile would and report each attention site's verdict."""
    recorder = _Recorder(config if config is not None else DeltaConfig())
    with torch.no_grad():
        torch.compile(model, backend=recorder)(*args, **kwargs)
    return recorder.report
