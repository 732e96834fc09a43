"""Rewriting judged attention sites of an FX graph into calls of the Δ op."""
from __future__ import annotations

import torch
import torch.fx as fx

from deltapass.kernels import LaunchConfig

from .config import DeltaConfig
from .sites import Site, find_sites


def delta_op_args(site: Site, config: DeltaConfig) -> tuple | None:
    """Positional arguments of torch.ops.deltapass.delta_attention for a site, or None to leave it exact."""
    site_config = config.for_site(site.name, site.layer)
    if site_config.correction == "dense":
        return None
    launch = list(LaunchConfig.from_kwargs(dict(site_config.launch)).to_dict().values())
    return (site.query, site.key, site.value, site_config.sink, site_config.window, site_config.gamma,
            site_config.correction, None if site.scale is None else float(site.scale), launch)


def _rank(node: fx.Node) -> int:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim()


def rewrite_graph(gm: fx.GraphModule, config: DeltaConfig, sites: list[Site] | None = None) -> list[Site]:
    """Replace every replaceable site with the Δ op, in place. Returns all sites with their verdicts.

    sites: find_sites(gm.graph) when the caller already has them (the backend reads them to pick the config).
    """
    sites = find_sites(gm.graph) if sites is None else sites
    mask_checks: dict[tuple[str, fx.Node], fx.Node] = {}
    for site in sites:
        if not site.replaceable:
            continue
        args = delta_op_args(site, config)
        if args is None:
            site.replaceable = False
            site.reason = "configured dense (correction='dense')"
            continue
        with gm.graph.inserting_before(site.node):
            bmm_form = _rank(site.query) == 3
            if site.runtime_mask is not None:
                kind, mask = site.runtime_mask
                if (kind, mask) not in mask_checks:    # layers sharing a mask check it once per call
                    # Sites come in graph order, so this lands before every site that uses the mask.
                    mask_checks[kind, mask] = gm.graph.call_function(
                        torch.ops.deltapass.mask_is_causal.default, (mask, kind))
                q, k, v, *rule = args
                args = (q, k, v, mask, kind, mask_checks[kind, mask], *rule)
            if bmm_form:
                # [batch * heads, seq, head_dim] -> [1, batch * heads, seq, head_dim] and back.
                args = tuple(gm.graph.call_method("unsqueeze", (t, 0)) for t in args[:3]) + args[3:]
            op = (torch.ops.deltapass.delta_attention if site.runtime_mask is None
                  else torch.ops.deltapass.delta_attention_masked)
            new = gm.graph.call_function(op.default, args)
            if bmm_form:
                new = gm.graph.call_method("squeeze", (new, 0))
        # Keep where the site came from; its value metadata belongs to the old op's output layout.
        new.meta.update({k: v for k, v in site.node.meta.items() if k not in ("example_value", "val", "tensor_meta")})
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
        site.node = new
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return sites
