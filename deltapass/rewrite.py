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


def rewrite_graph(gm: fx.GraphModule, config: DeltaConfig) -> list[Site]:
    """Replace every replaceable site with the Δ op, in place. Returns all sites with their verdicts."""
    sites = find_sites(gm.graph)
    for site in sites:
        if not site.replaceable:
            continue
        args = delta_op_args(site, config)
        if args is None:
            site.replaceable = False
            site.reason = "configured dense (correction='dense')"
            continue
        with gm.graph.inserting_before(site.node):
            new = gm.graph.call_function(torch.ops.deltapass.delta_attention.default, args)
        # Keep where the site came from; its value metadata belongs to the old op's output layout.
        new.meta.update({k: v for k, v in site.node.meta.items() if k not in ("example_value", "val", "tensor_meta")})
        site.node.replace_all_uses_with(new)
        gm.graph.erase_node(site.node)
        site.node = new
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return sites
