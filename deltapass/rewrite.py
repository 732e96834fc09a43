"""Rewriting an FX graph's attention sites as decided (deltapass.decision): Δ op, exact SDPA is_causal, or as is;
or, for the tuner, into run-time slots that read their decision per call (deltapass.switching)."""
from __future__ import annotations

import torch
import torch.fx as fx

from deltapass.kernels import LaunchConfig

from .decision import SiteDecision
from .fingerprint import tensor_meta
from .sites import Site
from .switching import site_slot  # noqa: F401  (registers deltapass::site_slot)


def _scale(site: Site) -> float | None:
    """The site's softmax scale as the ops take it (None: 1 / sqrt(head_dim))."""
    return None if site.scale is None else float(site.scale)


def _op_arguments(site: Site, decision: SiteDecision) -> tuple[tuple, dict]:
    """(rule args, launch kwargs) of the Δ ops after q, k, v (and the mask arguments)."""
    c = decision.config
    launch = LaunchConfig.from_kwargs(dict(c.launch)).to_dict()
    return (c.sink, c.window, c.gamma, c.correction, _scale(site)), launch


def _replacement(graph: fx.Graph, site: Site, qkv: tuple, decision: SiteDecision, mask_checks: dict) -> fx.Node:
    """The node computing what `decision` says for `site`; qkv: its inputs as [batch, heads, seq, head_dim]."""
    q, k, v = qkv
    if decision.mask_checked_per_call:
        kind, mask = site.runtime_mask
        if (kind, mask) not in mask_checks:    # layers sharing a mask check it once per call
            # Sites come in graph order, so this lands before every site that uses the mask.
            mask_checks[kind, mask] = graph.call_function(torch.ops.deltapass.mask_is_causal.default, (mask, kind))
        checked = (mask, kind, mask_checks[kind, mask])
    if decision.uses_delta:
        rule, launch = _op_arguments(site, decision)
        if decision.mask_checked_per_call:
            return graph.call_function(torch.ops.deltapass.delta_attention_masked.default,
                                       (q, k, v, *checked, *rule), launch)
        return graph.call_function(torch.ops.deltapass.delta_attention.default, (q, k, v, *rule), launch)
    scale = _scale(site)
    if decision.mask_checked_per_call:
        return graph.call_function(torch.ops.deltapass.exact_attention_masked.default, (q, k, v, *checked, scale))
    grouped = tensor_meta(site.query).shape[-3] != tensor_meta(site.key).shape[-3]
    return graph.call_function(torch._C._nn.scaled_dot_product_attention, (q, k, v),
                               {"is_causal": True, "scale": scale, "enable_gqa": grouped})


def rewrite_graph(gm: fx.GraphModule, sites: list[Site], decisions: list[SiteDecision]) -> None:
    """Replace each site as its decision says, in place. sites: find_sites(gm.graph), in graph order."""
    mask_checks: dict[tuple[str, fx.Node], fx.Node] = {}
    actions = {site.node: decision for site, decision in zip(sites, decisions, strict=True)}
    _replace_sites(gm, [s for s in sites if actions[s.node].action != "untouched"],
                   lambda site, qkv: _replacement(gm.graph, site, qkv, actions[site.node], mask_checks))


def rewrite_as_slots(gm: fx.GraphModule, sites: list[Site], board: int) -> None:
    """Replace every replaceable site by its run-time slot on `board` (deltapass.switching), in place.

    The slot's index is the site's position in `sites` (graph order), the index of its decision on the board.
    """
    slotted = [(i, s) for i, s in enumerate(sites) if s.replaceable]
    index = {s.node: i for i, s in slotted}
    _replace_sites(gm, [s for _, s in slotted], lambda site, qkv: gm.graph.call_function(
        torch.ops.deltapass.site_slot.default,
        (*qkv, board, index[site.node], _scale(site))))


def _replace_sites(gm: fx.GraphModule, sites: list[Site], build) -> None:
    """Swap each site's node for build(site, (q, k, v) as [batch, heads, seq, head_dim]), then clean up."""
    for site in sites:
        qkv = (site.query, site.key, site.value)
        bmm_form = tensor_meta(site.query).dim() == 3
        with gm.graph.inserting_before(site.node):
            if bmm_form:
                # [batch * heads, seq, head_dim] -> [1, batch * heads, seq, head_dim] and back.
                qkv = tuple(gm.graph.call_method("unsqueeze", (t, 0)) for t in qkv)
            new = build(site, qkv)
            if bmm_form:
                new = gm.graph.call_method("squeeze", (new, 0))
        # Keep where the site came from; its value metadata belongs to the old op's output layout.
        new.meta.update({k: v for k, v in site.node.meta.items() if k not in ("example_value", "val", "tensor_meta")})
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
