"""What one attention site gets: the single decision the pass, explain() and the tuner all read.

Actions:
  delta          - the Δ op with the site's rule (sink, window, gamma, correction, launch)
  delta_checked  - the masked Δ op: the mask comes from the inputs and is checked per call;
                   Δ when it is exactly causal, exact attention under the mask otherwise
  exact_causal   - SDPA(is_causal=True): the site is proven causal and configured dense, or
                   sink + window covers every token it can see, so Δ would be dense anyway
  exact_checked  - as exact_causal, behind the same per-call mask check (exact either way)
  untouched      - the pass cannot prove the site is causal self-attention it may change, or the site is a
                   chunk over a KV cache that stays exact (SDPA's is_causal aligns top-left, so a chunk
                   keeps its own attention under its bottom-right causal mask)

A chunk site (Site.chunk) takes the same Δ ops: they place its queries at the last N_q of the N_k key
positions and read the prompt's full length from deltapass.kernels.prompt_length() at call time.
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

    max_tokens: the most keys a query of this compiled graph can see (its static length, or the top of
    the length bucket it is guarded to); None when unbounded (a dynamic graph without a guard).
    """
    if not site.replaceable:
        return SiteDecision("untouched", None, site.reason)
    checked = site.runtime_mask is not None
    exact = None
    if config.correction == "dense":
        exact = "configured dense"
    elif max_tokens is not None and max_tokens <= config.sink + config.window:
        exact = f"sink + window ({config.sink + config.window}) covers all {max_tokens} tokens"
    if exact and site.chunk:
        if checked:     # exact_attention_masked reads a chunk's mask as given
            return SiteDecision("exact_checked", config, f"{exact}: exact attention under the chunk's mask")
        return SiteDecision("untouched", None, f"{exact}: the chunk keeps its exact attention under its mask")
    if exact:
        return SiteDecision("exact_checked" if checked else "exact_causal", config,
                            f"{exact}: exact SDPA is_causal" + _checked_note(checked))
    rule = f"{config.correction} sink={config.sink} window={config.window} gamma={config.gamma}"
    if site.chunk:
        rule += (" on a chunk over the KV cache (queries at the last key positions; the prompt's length from "
                 "deltapass.kernels.prompt_length(), else the chunk ends the prompt)")
    if checked:
        rule += " when its mask is bottom-right causal (checked per call)" if site.chunk else \
            " when the input mask is causal"
    return SiteDecision("delta_checked" if checked else "delta", config, rule)


def decide_all(sites: list[Site], config: DeltaConfig, max_tokens: int | None) -> list[SiteDecision]:
    return [decide(site, config.for_site(site.name, site.layer), max_tokens) for site in sites]


def _checked_note(checked: bool) -> str:
    return " (the input mask is checked per call; exact attention under it when it is not causal)" if checked else ""
