"""Reports: accuracy tables of several configs on one task set, and the tuner's Pareto front (markdown, JSON, PNG).

The comparison columns follow the issue's targets: retrieval as a fraction of dense,
and how much of sparse-only's continuation-loss gap a config closes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from deltapass import presets
from deltapass.config import DeltaConfig, SiteConfig

from .harness import Evaluation

RETRIEVAL = ("passkey", "multikey")


@dataclass(frozen=True)
class Summary:
    """One config against the dense and sparse-only baselines of the same run."""

    label: str
    retrieval_vs_dense: dict[str, float]     # kind -> accuracy / dense accuracy (pooled over lengths)
    loss: float
    loss_gap_closed: float                   # (loss_sparse - loss) / (loss_sparse - loss_dense)
    density: float                           # attended fraction of causal pairs at the longest length
    window_density: float                    # (sink + window) / longest length, the density
    latency_ms: float | None
    is_dense: bool = False                   # the baseline itself: targets do not apply

    def meets(self, retrieval: float = presets.RETRIEVAL_TARGET, gap: float = presets.LOSS_GAP_TARGET) -> bool:
        return all(v >= retrieval for v in self.retrieval_vs_dense.values()) and self.loss_gap_closed >= gap

    @property
    def verdict(self) -> str:
        return "baseline" if self.is_dense else ("yes" if self.meets() else "no")


def summarise(evaluations: list[Evaluation], latencies: dict[str, float] | None = None) -> list[Summary]:
    """Summaries relative to the dense run (config None) and the sparse-only run (every site "none") of the list."""
    dense = next(e for e in evaluations if e.config is None)
    sparse = next((e for e in evaluations
                   if e.config is not None and presets.is_sparse_only(DeltaConfig.from_dict(e.config))), None)
    dense_loss = _pooled(dense, "continuation")
    sparse_loss = _pooled(sparse, "continuation") if sparse else math.nan
    out = []
    for e in evaluations:
        ratios = {}
        for kind in RETRIEVAL:
            base = _pooled(dense, kind)
            if not math.isnan(base):
                ratios[kind] = _pooled(e, kind) / base if base > 0 else math.nan
        loss = _pooled(e, "continuation")
        gap = sparse_loss - dense_loss
        closed = (sparse_loss - loss) / gap if gap and not math.isnan(gap) and gap > 0 else math.nan
        longest = max(e.density) if e.density else 0
        out.append(Summary(e.label, ratios, loss, closed, e.density.get(longest, 1.0),
                           _window_density(e.config, longest), (latencies or {}).get(e.label), e.config is None))
    return out


def _pooled(e: Evaluation | None, kind: str) -> float:
    score = e.score(kind) if e is not None else None
    return score.value if score is not None else math.nan


def _window_density(config: dict | None, length: int) -> float:
    if config is None or not length:
        return 1.0
    c = DeltaConfig.from_dict(config)
    sites = [c.default, *c.sites.values(), *c.layers.values()]
    return max(min(1.0, (s.sink + s.window) / length) for s in sites if isinstance(s, SiteConfig))


def markdown(evaluations: list[Evaluation], summaries: list[Summary], title: str) -> str:
    """A per-cell table with sample counts and 95% intervals, then the summary against the targets."""
    cells = sorted({(s.kind, s.length) for e in evaluations for s in e.scores})
    lines = [f"## {title}", "", "| config | " + " | ".join(f"{k} {n}" for k, n in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for e in evaluations:
        row = []
        for kind, length in cells:
            s = e.score(kind, length)
            row.append("-" if s is None else f"{s.value:.3f} [{s.low:.3f}, {s.high:.3f}] n={s.n}")
        lines.append(f"| {e.label} | " + " | ".join(row) + " |")
    lines += ["", "| config | passkey / dense | multikey / dense | loss | sparse loss gap closed | "
              "attention density | (sink+window)/N | prefill ms | meets target |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        ratio = lambda k: f"{s.retrieval_vs_dense[k]:.2f}" if k in s.retrieval_vs_dense else "-"  # noqa: E731
        latency = "-" if s.latency_ms is None else f"{s.latency_ms:.1f}"
        lines.append(f"| {s.label} | {ratio('passkey')} | {ratio('multikey')} | {s.loss:.4f} | "
                     f"{_pct(s.loss_gap_closed)} | {s.density:.3f} | {s.window_density:.3f} | {latency} | "
                     f"{s.verdict} |")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def plot(summaries: list[Summary], path: str | Path, title: str) -> None:
    """Retrieval (vs dense) and loss-gap closed against attention density and prefill latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_latency = any(s.latency_ms is not None for s in summaries)
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(12 if has_latency else 6.5, 4.8), squeeze=False)
    for ax, (xname, xs) in zip(axes[0], [("attention density (fraction of causal pairs)",
                                          [s.density for s in summaries]),
                                         ("prefill latency (ms)", [s.latency_ms for s in summaries])]):
        for s, x in zip(summaries, xs):
            if x is None:
                continue
            retrieval = min(s.retrieval_vs_dense.values()) if s.retrieval_vs_dense else math.nan
            ax.scatter(x, retrieval, marker="o", color="tab:blue")
            if not math.isnan(s.loss_gap_closed):
                ax.scatter(x, s.loss_gap_closed, marker="x", color="tab:red")
            ax.annotate(s.label, (x, retrieval), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(presets.RETRIEVAL_TARGET, color="tab:blue", lw=0.6, ls="--")
        ax.axhline(presets.LOSS_GAP_TARGET, color="tab:red", lw=0.6, ls=":")
        ax.set_xlabel(xname)
        ax.set_ylabel("o: worst retrieval / dense    x: loss gap closed")
        ax.set_ylim(-0.6, 1.15)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write(evaluations: list[Evaluation], out_dir: str | Path, name: str, title: str,
          latencies: dict[str, float] | None = None, meta: dict | None = None) -> list[Summary]:
    """{name}.md, {name}.json and {name}.png under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarise(evaluations, latencies)
    (out_dir / f"{name}.md").write_text(markdown(evaluations, summaries, title))
    payload = {"title": title, "meta": meta or {}, "evaluations": [e.to_dict() for e in evaluations],
               "summaries": [s.__dict__ for s in summaries]}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float))
    plot(summaries, out_dir / f"{name}.png", title)
    return summaries


# ---- the tuner's study ---------------------------------------------------------------------------------

def pareto_table(pareto: list[dict]) -> str:
    """The Pareto front of a study (TuneResult.pareto) as a markdown table, fastest first."""
    lines = ["| trial | retrieval / dense | Δ loss (nats) | prefill ms | density | params |",
             "|---|---|---|---|---|---|"]
    for p in pareto:
        density = "-" if p["density"] is None else f"{p['density']:.3f}"
        params = " ".join(f"{k}={v}" for k, v in sorted(p["params"].items()))
        lines.append(f"| {p['trial']} | {p['retrieval']:.2f} | {p['loss_delta']:+.4f} | {p['latency_ms']:.2f} | "
                     f"{density} | {params} |")
    return "\n".join(lines)


def pareto_plot(study, path: str | Path, title: str, dense_latency_ms: float | None = None) -> None:
    """Loss delta vs latency for every complete trial, colour = retrieval ratio, Pareto front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    points = ax.scatter([t.values[2] for t in done], [t.values[1] for t in done], c=[t.values[0] for t in done],
                        cmap="viridis", vmin=0, vmax=1, s=22)
    ax.scatter([t.values[2] for t in done if t.number in front], [t.values[1] for t in done if t.number in front],
               facecolors="none", edgecolors="red", s=70, label="Pareto front")
    if dense_latency_ms is not None:
        ax.axvline(dense_latency_ms, color="black", lw=0.8, ls="--", label="all-dense prefill")
    fig.colorbar(points, label="retrieval / dense")
    ax.set_xlabel("prefill latency (ms)")
    ax.set_ylabel("continuation loss - dense (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
