"""What one attention site gets: the single decision the pass, explain() and the tuner all read.

Actions:
  delta          - the Δ op with the site's rule (sink, window, gamma, correction, launch)
  delta_checked  - the masked Δ op: the mask comes from the inputs and is checked per call;
                   Δ when it is exactly causal, exact attention under the mask otherwise
  exact_causal   - SDPA(is_causal=True): the site is proven causal and configured dense, or
                   sink + window covers every token it can see, so Δ would be dense anyway
  exact_checked  - as exact_causal, behind the same per-call mask check (exact either way)
  untouched      - the pass cannot prove the site is causal self-attention it may change
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DeltaConfig, SiteConfig
from .sites import Site

ACTIONS = ("delta", "delta_checked", "exact_causal", "exact_checked", "untouched")
DELTA_ACTIONS = ("delta", "delta_checked")


@dataclass(frozen=True)
class SiteDecision:
    action: str
    config: SiteConfig | None          # the site's config (None when untouched)
    reason: str                        # why, in words a user can act on

    @property
    def uses_delta(self) -> bool:
        return self.action in DELTA_ACTIONS

    @property
    def mask_checked_per_call(self) -> bool:
        return self.action in ("delta_checked", "exact_checked")


def decide(site: Site, config: SiteConfig, max_tokens: int | None) -> SiteDecision:
    """The action for `site` under `config`.

    max_tokens: the longest query this compiled graph can run (its static length, or the top of
    the length bucket it is guarded to); None when unbounded (a dynamic graph without a guard).
    """
    if not site.replaceable:
        return SiteDecision("untouched", None, site.reason)
    checked = site.runtime_mask is not None
    if config.correction == "dense":
        return SiteDecision("exact_checked" if checked else "exact_causal", config,
                            "configured dense: exact SDPA is_causal" + _checked_note(checked))
    if max_tokens is not None and max_tokens <= config.sink + config.window:
        return SiteDecision("exact_checked" if checked else "exact_causal", config,
                            f"sink + window ({config.sink + config.window}) covers all {max_tokens} tokens: "
                            "exact SDPA is_causal" + _checked_note(checked))
    rule = f"{config.correction} sink={config.sink} window={config.window} gamma={config.gamma}"
    return SiteDecision("delta_checked" if checked else "delta", config,
                        rule + (" when the input mask is causal" if checked else ""))


def decide_all(sites: list[Site], config: DeltaConfig, max_tokens: int | None) -> list[SiteDecision]:
    return [decide(site, config.for_site(site.name, site.layer), max_tokens) for site in sites]


def _checked_note(checked: bool) -> str:
    return " (the input mask is checked per call; exact attention under it when it is not causal)" if checked else ""
