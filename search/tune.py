"""The tuning job: tiles by timing the op, then sparsity and per-layer corrections by a multi-objective study.

Objectives of a sparsity trial (one Optuna study, Pareto front):
  retrieval  - the worse of passkey and multi-key accuracy as a fraction of dense   (maximise)
  loss_delta - continuation loss minus dense loss, in nats                          (minimise)
  latency    - median warm prefill of the whole model at the target length, in ms   (minimise)
The chosen config is the fastest trial within the user's budget (Budget); it is written to the
per-GPU cache, where torch.compile(model, backend="delta") finds it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import optuna
import torch

from deltapass.cache import (CacheEntry, HardwareKey, TunedConfigCache, default_meta, length_bucket,
                             model_fingerprint, signature_from_sites)
from deltapass.config import DeltaConfig
from deltapass.kernels import delta_attention
from deltapass.sites import find_sites

from .harness import Evaluation, evaluate, prefill_latency_ms
from .models import LoadedModel
from .space import SparsitySpace, TileChoice, TileSpace, config_from_choices, suggest, uniform_choices
from .storage import load_or_create_study, open_storage
from .tasks import build_tasks

log = logging.getLogger("deltapass.search.tune")

DIRECTIONS = ["maximize", "minimize", "minimize"]          # retrieval, loss_delta, latency
OBJECTIVES = ("retrieval", "loss_delta", "latency_ms")
_warned: list[bool] = []


@dataclass(frozen=True)
class Budget:
    """How much accuracy the user gives up for speed."""

    min_retrieval: float = 0.95          # worse of passkey / multi-key, as a fraction of dense
    max_loss_delta: float = 0.02         # continuation loss above dense, nats per token

    def admits(self, values: tuple[float, float, float]) -> bool:
        return values[0] >= self.min_retrieval and values[1] <= self.max_loss_delta


@dataclass
class TuneSettings:
    length: int = 8192
    trials: int = 64
    samples: int = 8                     # tasks per kind at `length`
    batch_size: int = 8
    seed: int = 0
    study: str | None = None             # default: derived from model fingerprint, device and length
    storage: str | None = None           # Optuna storage URL or journal path; None = journal in the cache dir
    timeout: float | None = None         # seconds for the sparsity study (None: until `trials`)
    tile_trials: bool = True
    space: SparsitySpace = field(default_factory=SparsitySpace)
    budget: Budget = field(default_factory=Budget)


@dataclass
class TuneResult:
    study_name: str
    config: DeltaConfig
    values: tuple[float, float, float]
    within_budget: bool
    pareto: list[dict]
    baseline: dict
    tiles: dict
    cache_path: str | None
    seconds: float

    def to_dict(self) -> dict:
        return {"study": self.study_name, "config": self.config.to_dict(), "values": dict(zip(OBJECTIVES, self.values)),
                "within_budget": self.within_budget, "pareto": self.pareto, "baseline": self.baseline,
                "tiles": self.tiles, "cache_path": self.cache_path, "seconds": round(self.seconds, 1)}


def model_signature_fingerprint(loaded: LoadedModel) -> str:
    """The fingerprint the backend computes for this model's graph (same sites, same definition)."""
    sites = []

    def record(gm, example_inputs):
        sites.extend(find_sites(gm.graph))
        return gm.forward

    device = next(loaded.model.parameters()).device
    ids = torch.zeros(1, 128, dtype=torch.long, device=device)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(loaded.model, backend=record)(ids)
    torch._dynamo.reset()
    return model_fingerprint(signature_from_sites(sites))


# ---- phase 1: tiles, timed on the op alone --------------------------------------------------------

def tune_tiles(loaded: LoadedModel, length: int, storage, study_name: str, space: TileSpace = TileSpace()) -> dict:
    """Best launch parameters for the model's attention shape at `length` (empty when tiles do not apply)."""
    device = next(loaded.model.parameters()).device
    if device.type != "cuda":
        log.info("tiles: skipped on %s (the CPU path runs the exact reference, tiles do not apply)", device)
        return {}
    cfg = loaded.model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    dtype = next(loaded.model.parameters()).dtype
    q = torch.randn(1, hq, length, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, length, d, device=device, dtype=dtype)
    v = torch.randn(1, hkv, length, d, device=device, dtype=dtype)
    rule = dict(sink=64, window=256, gamma=64, correction="delta")
    grid = space.grid()
    study = load_or_create_study(study_name, storage, ["minimize"], sampler=optuna.samplers.GridSampler(grid, seed=0))

    def objective(trial: optuna.Trial) -> float:
        from triton.testing import do_bench

        choice = TileChoice(space.parse(trial.suggest_categorical("sparse", grid["sparse"])),
                            space.parse(trial.suggest_categorical("dense", grid["dense"])))
        launch = choice.launch()
        trial.set_user_attr("launch", launch)
        return float(do_bench(lambda: delta_attention(q, k, v, **rule, **launch), warmup=10, rep=50,
                              return_mode="median"))

    remaining = len(grid["sparse"]) * len(grid["dense"]) - len(study.get_trials(deepcopy=False))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(Exception,))   # out-of-resources tiles: FAIL
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        log.warning("tiles: every candidate failed; keeping the defaults")
        return {}
    best = min(done, key=lambda t: t.value)
    log.info("tiles: best %s at %.3f ms (%d of %d candidates ran)", best.params, best.value, len(done),
             len(study.get_trials(deepcopy=False)))
    return dict(best.user_attrs["launch"])


# ---- phase 2: sparsity and per-layer corrections ---------------------------------------------------

def _retrieval_ratio(e: Evaluation, dense: Evaluation) -> float:
    ratios = []
    for kind in ("passkey", "multikey"):
        base, got = dense.score(kind), e.score(kind)
        if base is not None and got is not None and base.value > 0:
            ratios.append(got.value / base.value)
    if not ratios:       # dense retrieves nothing at this length: retrieval cannot rank configs
        log.log(logging.WARNING if not _warned else logging.DEBUG,
                "dense attention answers no retrieval task; retrieval ratio set to 1 for every trial")
        _warned.append(True)
        return 1.0
    return min(ratios)


def tune(loaded: LoadedModel, settings: TuneSettings, *, cache: TunedConfigCache | None = None,
         progress: bool = True) -> TuneResult:
    """Run (or join, or resume) the tuning study for this model on this device and cache its pick."""
    start = time.perf_counter()
    device = next(loaded.model.parameters()).device
    hardware = HardwareKey.current(device)
    fingerprint = model_signature_fingerprint(loaded)
    name = settings.study or f"{loaded.name}-{fingerprint}-{hardware.slug}-n{settings.length}"
    storage = open_storage(settings.storage)
    layers = loaded.model.config.num_hidden_layers
    tiles = tune_tiles(loaded, settings.length, storage, f"{name}-tiles") if settings.tile_trials else {}

    tasks = build_tasks(loaded.tokenizer, lengths=(settings.length,), samples=settings.samples, seed=settings.seed)
    dense = evaluate(loaded, None, tasks, batch_size=settings.batch_size)
    dense_latency = prefill_latency_ms(loaded, None, settings.length)
    baseline = {"dense": dense.to_dict(), "dense_latency_ms": dense_latency}

    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, constant_liar=True)
    study = load_or_create_study(name, storage, DIRECTIONS, sampler=sampler)
    if not study.get_trials(deepcopy=False):
        # Start from the fixed rules the study must beat: the paper's (delta everywhere, gamma 64) first.
        for correction in ("delta", "recompute", "none"):
            pairs = settings.space.windows_for(settings.length)
            s, w = max(pairs, key=lambda p: (p[0] + p[1], p[0]))
            study.enqueue_trial(uniform_choices(settings.space, layers, correction, f"{s}+{w}", 64))

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        choices = suggest(trial, settings.space, layers, settings.length)
        config = config_from_choices(choices, layers, tiles)
        e = evaluate(loaded, config, tasks, batch_size=settings.batch_size, label=f"trial {trial.number}")
        latency = prefill_latency_ms(loaded, config, settings.length)
        values = (_retrieval_ratio(e, dense), e.score("continuation").value - dense.score("continuation").value,
                  latency)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("scores", [asdict(s) for s in e.scores])
        trial.set_user_attr("density", e.density.get(settings.length))
        return values

    done = len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    todo = max(0, settings.trials - done)
    bar = _Bar(todo, settings.budget) if progress and todo else None
    callbacks = [bar.callback] if bar else []
    with torch.no_grad():
        study.optimize(objective, n_trials=todo, timeout=settings.timeout, catch=(Exception,), callbacks=callbacks)
    if bar:
        bar.close()
    return _finish(study, settings, loaded, hardware, fingerprint, tiles, baseline, cache, start)


def pick(study: optuna.Study, budget: Budget) -> tuple[optuna.trial.FrozenTrial, bool]:
    """The fastest complete trial within the budget; else the one closest to it (best retrieval, then loss)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
            and not any(math.isnan(v) for v in t.values)]
    if not done:
        raise RuntimeError(f"study {study.study_name!r} has no complete trial")
    feasible = [t for t in done if budget.admits(tuple(t.values))]
    if feasible:
        return min(feasible, key=lambda t: t.values[2]), True
    return max(done, key=lambda t: (min(t.values[0], budget.min_retrieval), -t.values[1], -t.values[2])), False


def _finish(study, settings, loaded, hardware, fingerprint, tiles, baseline, cache, start) -> TuneResult:
    best, ok = pick(study, settings.budget)
    config = DeltaConfig.from_dict(best.user_attrs["config"])
    pareto = [{"trial": t.number, **dict(zip(OBJECTIVES, t.values)), "density": t.user_attrs.get("density"),
               "params": t.params} for t in sorted(study.best_trials, key=lambda t: t.values[2])]
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    meta = default_meta() | {"study": study.study_name, "trial": best.number, "values": dict(zip(OBJECTIVES, best.values)),
                             "within_budget": ok, "budget": asdict(settings.budget), "model": loaded.name,
                             "length": settings.length, "trials": {s: states.count(s) for s in set(states)}}
    cache = cache if cache is not None else TunedConfigCache()
    path = cache.save(CacheEntry(hardware, fingerprint, length_bucket(settings.length), config, meta))
    log.info("tuned config of trial %d saved to %s (%s)", best.number, path,
             "within budget" if ok else "no trial met the budget: closest one")
    return TuneResult(study.study_name, config, tuple(best.values), ok, pareto, baseline, tiles, str(path),
                      time.perf_counter() - start)


class _Bar:
    """A tqdm bar whose postfix is the best trial so far within the budget."""

    def __init__(self, total: int, budget: Budget) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="tuning", unit="trial")
        self.budget = budget

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.bar.update(1)
        try:
            best, ok = pick(study, self.budget)
            r, dl, ms = best.values
            self.bar.set_postfix_str(f"{'best' if ok else 'closest'}: #{best.number} {ms:.1f} ms, "
                                     f"retrieval {r:.2f}, Δloss {dl:+.3f}")
        except RuntimeError:
            pass

    def close(self) -> None:
        self.bar.close()


def pareto_table(result: TuneResult) -> str:
    lines = ["| trial | retrieval / dense | Δ loss (nats) | prefill ms | density | params |",
             "|---|---|---|---|---|---|"]
    for p in result.pareto:
        density = "-" if p["density"] is None else f"{p['density']:.3f}"
        params = " ".join(f"{k}={v}" for k, v in sorted(p["params"].items()))
        lines.append(f"| {p['trial']} | {p['retrieval']:.2f} | {p['loss_delta']:+.4f} | {p['latency_ms']:.2f} | "
                     f"{density} | {params} |")
    return "\n".join(lines)


def pareto_plot(study: optuna.Study, path: str, title: str) -> None:
    """Loss delta vs latency for every complete trial, colour = retrieval ratio, Pareto front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    points = ax.scatter([t.values[2] for t in done], [t.values[1] for t in done], c=[t.values[0] for t in done],
                        cmap="viridis", vmin=0, vmax=1, s=22)
    ax.scatter([t.values[2] for t in done if t.number in front], [t.values[1] for t in done if t.number in front],
               facecolors="none", edgecolors="red", s=70, label="Pareto front")
    fig.colorbar(points, label="retrieval / dense")
    ax.set_xlabel("prefill latency (ms)")
    ax.set_ylabel("continuation loss - dense (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
