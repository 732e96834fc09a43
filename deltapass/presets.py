"""Named configs and targets: the one place each preset's numbers live.

Labels are made from configs (`label`), never parsed back into them.
"""
from __future__ import annotations

from deltapass.config import DeltaConfig, SiteConfig
# The accuracy targets of the harness and the tuner's default budget, named here with the presets; their numbers
# live in deltapass/defaults.py, which the CLI's --help reads without importing torch.
from deltapass.defaults import LOSS_GAP_TARGET, MAX_LOSS_DELTA, RETRIEVAL_TARGET  # noqa: F401

# The paper's rule (Delta Attention, arXiv 2505.11254), Δ on every layer: SiteConfig's own defaults
# (sink 1024 + window 2048, gamma 64), so a bare DeltaConfig() is the paper's config.
PAPER = SiteConfig()
# The small rule used on the 8K embedded model: sink 64 + window 256, gamma 64.
SMALL = SiteConfig(sink=64, window=256, gamma=64, correction="delta")
# Every site exact: SDPA is_causal where the pass proves causality. The dense baseline users could assemble.
ALL_DENSE = DeltaConfig(default=SiteConfig(correction="dense"))


def uniform(site: SiteConfig = SMALL, correction: str | None = None) -> DeltaConfig:
    """One site config on every layer, optionally with another correction."""
    if correction is not None:
        site = SiteConfig(sink=site.sink, window=site.window, gamma=site.gamma, correction=correction,
                          launch=dict(site.launch))
    return DeltaConfig(default=site)


def site_label(site: SiteConfig) -> str:
    if site.correction == "dense":
        return "dense"
    return f"{site.correction} s{site.sink}+w{site.window} g{site.gamma}"


def label(config: DeltaConfig | None) -> str:
    """A short human label: the default site's rule, then how many sites/layers override it."""
    if config is None or config == ALL_DENSE:
        return "dense"
    overrides = len(config.sites) + len(config.layers)
    return site_label(config.default) + (f" +{overrides} overrides" if overrides else "")


def is_sparse_only(config: DeltaConfig | None) -> bool:
    """Every site sparse with no correction: the baseline whose loss gap the corrections close."""
    if config is None:
        return False
    sites = [config.default, *config.sites.values(), *config.layers.values()]
    return all(s.correction == "none" for s in sites)
