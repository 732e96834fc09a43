"""The tuning job: tiles by timing the op, then sparsity and per-layer corrections by a multi-objective study.

Objectives of a sparsity trial (one Optuna study, Pareto front):
  retrieval  - the worse of passkey and multi-key accuracy as a fraction of dense   (maximise)
  loss_delta - continuation loss minus dense loss, in nats                          (minimise)
  latency    - median warm prefill of the whole model at the target length, in ms   (minimise)
Every trial runs through one compiled model (harness.CompiledModel, switched): torch.compile(model,
backend="delta") lowered once with run-time site slots, so a trial costs its runs, not a compile;
under CUDA graphs on a GPU, one recording per config. The all-dense config (SDPA is_causal at every
proven-causal site) is the baseline, timed the same way in the same process.
The candidate is the fastest trial within the user's budget (Budget). It and all-dense are then
timed again on the graph users get (one ordinary compile each, constants in the graph), and the
candidate is chosen only if it beats all-dense there; otherwise all-dense is chosen and the result
says so. The choice is written to the per-GPU cache, where torch.compile(model, backend="delta")
finds it for this length bucket.
"""
from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import optuna
import torch
from optuna.trial import TrialState

from deltapass import defaults, presets
from deltapass.cache import CacheEntry, HardwareKey, TunedConfigCache, default_meta, length_bucket
from deltapass.config import DeltaConfig
from deltapass.explaining import fingerprint
from deltapass.kernels import delta_attention

from .calibrate import calibrate
from .harness import CompiledModel, Evaluation, Latency, evaluate
from .models import LoadedModel
from .pruning import Stopped, evaluate_halving
from .space import (SparsitySpace, TileChoice, TileSpace, calibrated_seeds, config_from_choices, suggest,
                    uniform_choices)
from .storage import fail_stale_trials, load_or_create_study, open_storage
from .tasks import build_tasks

log = logging.getLogger("deltapass.search.tune")

DIRECTIONS = ["maximize", "minimize", "minimize"]          # retrieval, loss_delta, latency
OBJECTIVES = ("retrieval", "loss_delta", "latency_ms")
MAX_FAILED_TRIALS = 8                                     # failures beyond --trials before the study gives up
MAX_SKIPPED_TRIALS = 100                                  # repeats and surplus trials pruned before one run gives up
WAIT_POLL_SECONDS = 1.0                                   # while other workers' running trials would fill the study
STOPPED_ATTR = "stopped"                                  # user attr of a trial stopped on its first slice (pruning.py)


@dataclass(frozen=True)
class Budget:
    """How much accuracy the user gives up for speed."""

    min_retrieval: float = presets.RETRIEVAL_TARGET    # worse of passkey / multi-key, as a fraction of dense
    max_loss_delta: float = presets.MAX_LOSS_DELTA     # continuation loss above dense, nats per token

    def admits(self, values: tuple[float, float, float]) -> bool:
        return values[0] >= self.min_retrieval and values[1] <= self.max_loss_delta


@dataclass
class TuneSettings:
    length: int = defaults.TUNE_LENGTH
    trials: int = defaults.TUNE_TRIALS   # completed trials (failed ones are retried, up to MAX_FAILED_TRIALS)
    samples: int = defaults.TUNE_SAMPLES  # tasks per kind at `length`
    batch_size: int = defaults.TUNE_BATCH_SIZE  # prompts per prefill: at 1, scoring and timing share one graph shape,
                                         # so each config compiles once
    seed: int | None = None              # the sampler's; None: fresh per process, so parallel workers and
                                         # resumed runs draw different parameters
    task_seed: int = defaults.TUNE_TASK_SEED  # the task set's: every worker of a study must use the same
    study: str | None = None             # default: derived from model fingerprint, device and length
    storage: str | None = None           # Optuna storage URL or journal path; None = journal in the cache dir
    timeout: float | None = None         # seconds for the sparsity study (None: until `trials`)
    tile_trials: bool = True
    calibrate: bool = True               # one dense forward ranks layers; its picks seed the study
    prune: bool = True                   # stop a trial whose retrieval on its first slice is out of the budget's reach
    space: SparsitySpace = field(default_factory=SparsitySpace)
    budget: Budget = field(default_factory=Budget)


@dataclass(frozen=True)
class Confirmation:
    """The candidate and all-dense timed on the graph users get, after the search, in the same process."""

    trial: int | None                    # the candidate (None: no trial within the budget, only dense timed)
    dense: Latency
    candidate: Latency | None
    logits_max_diff: float | None        # candidate's last-position logits on one task: search engine vs user graph

    def to_dict(self) -> dict:
        return {"trial": self.trial, "dense": asdict(self.dense),
                "candidate": None if self.candidate is None else asdict(self.candidate),
                "logits_max_diff": self.logits_max_diff}


@dataclass
class TuneResult:
    study_name: str
    config: DeltaConfig
    values: tuple[float, float, float]   # of the chosen config (all-dense: 1, 0, its latency)
    verdict: str                         # "within budget", "dense wins" or "no trial met the budget"
    trial: int | None                    # the chosen trial (None: all-dense)
    pareto: list[dict]
    baseline: dict
    tiles: dict
    cache_path: str | None
    seconds: float
    calibration: dict | None = None      # Calibration.to_dict() of the first stage, when it ran
    confirmation: dict | None = None     # Confirmation.to_dict()
    stages: dict = field(default_factory=dict)    # seconds per stage (calibration, trials, confirmation, ...)

    def to_dict(self) -> dict:
        return {"study": self.study_name, "config": self.config.to_dict(), "values": dict(zip(OBJECTIVES, self.values)),
                "verdict": self.verdict, "trial": self.trial, "pareto": self.pareto, "baseline": self.baseline,
                "tiles": self.tiles, "cache_path": self.cache_path, "seconds": round(self.seconds, 1),
                "stages": {k: round(v, 1) for k, v in self.stages.items()}, "calibration": self.calibration,
                "confirmation": self.confirmation}


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
    rule = presets.SMALL.op_arguments()
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

def _retrieval_ratio(e: Evaluation, dense: Evaluation) -> float | None:
    """The worse of passkey and multi-key as a fraction of dense; None when dense answers none of either."""
    ratios = []
    for kind in ("passkey", "multikey"):
        base, got = dense.score(kind), e.score(kind)
        if base is not None and got is not None and base.value > 0:
            ratios.append(got.value / base.value)
    return min(ratios) if ratios else None


def _say(progress: bool, message: str) -> None:
    """A stage's progress line for the person running the study (through tqdm, so a bar is not torn), else the
    log."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message)
    else:
        log.info(message)


def tune(loaded: LoadedModel, settings: TuneSettings, *, cache: TunedConfigCache | None = None,
         progress: bool = True, model: CompiledModel | None = None, label: str = "") -> TuneResult:
    """Run (or join, or resume) the tuning study for this model on this device and cache its pick.

    model: the search engine (CompiledModel(loaded, switched=True)) of an earlier job on this model, to reuse;
    label: what each progress line starts with (tune_lengths names the length there).
    """
    start = time.perf_counter()

    def say(message: str) -> None:
        _say(progress, label + message)

    cache = cache if cache is not None else TunedConfigCache()
    cache.check_writable()                       # fail now, not after the study
    device = next(loaded.model.parameters()).device
    hardware = HardwareKey.current(device)
    with torch.no_grad():
        fingerprint_hex = fingerprint(loaded.model)
    name = settings.study or f"{loaded.name}-{fingerprint_hex}-{hardware.slug}-n{settings.length}"
    storage = open_storage(settings.storage)
    layers = loaded.model.config.num_hidden_layers
    stages = _Stages()
    if settings.tile_trials:
        say("tiles: timing launch parameters of the Δ kernels")
    tiles = tune_tiles(loaded, settings.length, storage, f"{name}-tiles") if settings.tile_trials else {}
    stages.done("tiles")

    model = model if model is not None else CompiledModel(loaded, switched=True)
    tasks = build_tasks(loaded.tokenizer, lengths=(settings.length,), samples=settings.samples,
                        seed=settings.task_seed)
    say(f"dense baseline: {len(tasks)} tasks at {settings.length} tokens, then its prefill latency")
    dense = evaluate(model, None, tasks, batch_size=settings.batch_size, label="dense")
    dense_latency = model.latency(None, settings.length)
    baseline = {"dense": dense.to_dict(), "search_dense_latency": asdict(dense_latency)}
    stages.done("dense baseline")
    say(f"dense: {_cells(dense)}, prefill {dense_latency.median_ms:.2f} ms")
    if _retrieval_ratio(dense, dense) is None:
        log.warning("dense attention answers no retrieval task at %d tokens: retrieval cannot rank configs "
                    "(every trial scores 1)", settings.length)

    sampler_seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(1 << 32)
    log.info("study %r: sampler seed %d, task seed %d", name, sampler_seed, settings.task_seed)
    # group=True: a layer's gamma exists only where its correction samples rows (space.suggest).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True, group=True, constant_liar=True)
    study = load_or_create_study(name, storage, DIRECTIONS, sampler=sampler)
    calibration = None
    if settings.calibrate:
        say(f"calibration: one dense forward of {settings.length} tokens, attention outside sink + window")
        calibration = calibrate(loaded, settings.length, settings.space.windows_for(settings.length))
        stages.done("calibration")
    if not study.get_trials(deepcopy=False):
        # Start from the fixed rules the study must beat (the paper's Δ everywhere first), then the calibrated
        # per-layer assignments: the sampler refines from there.
        # Their sink + window: the paper's where the space has it (from 64K on), else the largest pair.
        pairs = settings.space.windows_for(settings.length)
        paper = (presets.PAPER.sink, presets.PAPER.window)
        s, w = paper if paper in pairs else max(pairs, key=lambda p: (p[0] + p[1], p[0]))
        for correction in ("delta", "recompute", "none"):
            if correction in settings.space.corrections:
                study.enqueue_trial(uniform_choices(settings.space, layers, correction, f"{s}+{w}",
                                                    presets.SMALL.gamma), skip_if_exists=True)
        if calibration is not None:
            for params in calibrated_seeds(calibration, settings.space, layers, settings.length):
                study.enqueue_trial(params, skip_if_exists=True)    # a 0-dense seed can equal a uniform rule

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        choices = suggest(trial, settings.space, layers, settings.length)
        prune_if_repeated(trial)
        config = config_from_choices(choices, layers, tiles)
        trial.set_user_attr("config", config.to_dict())

        def run(part):
            return evaluate(model, config, part, batch_size=settings.batch_size, label=f"trial {trial.number}")

        def report(first):              # the intermediate value: multi-objective trials cannot trial.report()
            trial.set_user_attr("first_slice", {"tasks": sum(s.n for s in first.scores),
                                                "retrieval": _retrieval_ratio(first, dense)})

        if settings.prune:
            try:
                e = evaluate_halving(run, tasks, dense, settings.budget.min_retrieval, report)
            except Stopped as stop:
                trial.set_user_attr(STOPPED_ATTR, {"tasks": stop.evaluated, "of": len(tasks), "reason": stop.reason})
                raise optuna.TrialPruned(f"stopped on its first slice: {stop.reason}") from None
        else:
            e = run(tasks)
        latency = model.latency(config, settings.length)
        ratio = _retrieval_ratio(e, dense)
        values = (1.0 if ratio is None else ratio,
                  e.score("continuation").value - dense.score("continuation").value, latency.median_ms)
        trial.set_user_attr("scores", [asdict(s) for s in e.scores])
        trial.set_user_attr("density", e.density.get(settings.length))
        trial.set_user_attr("latency", asdict(latency))
        return values

    say(f"trials: {max(0, settings.trials - len(finished_trials(study)))} to run of {settings.trials}")
    # The bar appears when the trials start: through the stages before them it would stand at 0.
    bar = _Bar(settings.trials, settings.budget, f"{label}tuning") if progress else None
    if bar:
        bar.start(len(finished_trials(study)))
    run_trials(study, objective, settings.trials, timeout=settings.timeout, callbacks=[bar.callback] if bar else [])
    stages.done("trials")
    if bar:
        bar.close()
    # Every trial may have been stopped on its first slice: then none is within the budget, and none is closest.
    candidate, ok = pick(study, settings.budget) if _complete(study) else (None, False)
    say((f"confirming trial {candidate.number} and all-dense" if ok else
         "no trial within the budget; timing all-dense") + " on the graph users get (one compile each)")
    confirmation = confirm(loaded, model, tasks[0], candidate if ok else None, settings.length)
    baseline["dense_latency"] = asdict(confirmation.dense)
    stages.done("confirmation")
    # The candidate confirmed is the one picked: another worker's later trials do not change it.
    result = _finish(study, settings, loaded, hardware, fingerprint_hex, tiles, baseline, candidate, ok,
                     confirmation, cache, start)
    result.calibration = None if calibration is None else calibration.to_dict()
    result.confirmation = confirmation.to_dict()
    result.stages = stages.seconds
    return result


def check_lengths(lengths: Sequence[int]) -> list[int]:
    """`lengths` as a list, if each is a positive int in a cache bucket of its own; else a ValueError naming them."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths must name at least one prompt length, got lengths=[]")
    buckets: dict[int, int] = {}
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"every length must be a positive int, got {n!r} in lengths={lengths}")
        if length_bucket(n) in buckets:
            raise ValueError(f"lengths {buckets[length_bucket(n)]} and {n} share the cache bucket {length_bucket(n)}: "
                             f"one entry serves both, so tune one of them, got lengths={lengths}")
        buckets[length_bucket(n)] = n
    return lengths


def tune_lengths(loaded: LoadedModel, settings: TuneSettings, lengths: Sequence[int], *,
                 cache: TunedConfigCache | None = None, progress: bool = True) -> list[TuneResult]:
    """One tuning job per length, in the given order, each writing the cache entry of its length bucket.

    What the jobs share: the loaded model and the search engine (one DeltaBackend and torch.compile wrapper;
    Dynamo traces each new prompt length once, as it would for one job). Each length has its own study
    (settings.study, if given, gets "-n{length}" when there are several lengths), dense baseline, calibration
    (one dense forward at the length: nothing shorter measures it) and confirmation. Progress lines start
    with "[i/k: N tokens]".
    """
    lengths = check_lengths(lengths)
    model = CompiledModel(loaded, switched=True)
    results = []
    for i, n in enumerate(lengths):
        study = settings.study if settings.study is None or len(lengths) == 1 else f"{settings.study}-n{n}"
        each = replace(settings, length=n, study=study)
        results.append(tune(loaded, each, cache=cache, progress=progress, model=model,
                            label=f"[{i + 1}/{len(lengths)}: {n} tokens] " if len(lengths) > 1 else ""))
    return results


def confirm(loaded: LoadedModel, search: CompiledModel, task, candidate: optuna.trial.FrozenTrial | None,
            length: int) -> Confirmation:
    """Time all-dense and the candidate on the graph torch.compile(model, backend=deltapass.backend(config))
    builds, and compare the candidate's logits on one task with the search engine's."""
    users = CompiledModel(loaded, mode=search.mode)
    dense = users.latency(None, length)
    if candidate is None:
        return Confirmation(None, dense, None, None)
    config = DeltaConfig.from_dict(candidate.user_attrs["config"])
    latency = users.latency(config, length)
    ids = task.input_ids[None].to(search.device)
    searched, _ = search.prefill(ids, config)
    built, _ = users.prefill(ids, config)
    return Confirmation(candidate.number, dense, latency, float((searched.float() - built.float()).abs().max()))


def run_trials(study: optuna.Study, objective, trials: int, *, timeout: float | None = None,
               callbacks=(), max_failed: int = MAX_FAILED_TRIALS, max_skipped: int = MAX_SKIPPED_TRIALS,
               poll: float = WAIT_POLL_SECONDS) -> int:
    """Optimize until the study holds `trials` finished trials (any worker's); returns this run's failures.

    Finished: complete, or stopped on its first slice (pruning.py; a PRUNED trial with STOPPED_ATTR).
    A trial starts only while the study's finished and running trials are fewer than `trials`; when
    other workers' running trials would fill it, this run waits for them (a dead worker's trial is
    failed once its heartbeat is stale, and retried). A trial that still finds `trials` finished or
    running trials numbered before it (workers that asked at the same moment) is pruned unrun, so
    the study ends with exactly `trials` finished trials. A failed trial (say, out of memory) does
    not count: the next one gets new parameters, up to `max_failed` failures in this run, after
    which the run stops with a warning; so it does after `max_skipped` pruned trials (repeats, see
    prune_if_repeated, and surplus ones).
    """
    def within_count(trial: optuna.Trial):
        ahead = [t for t in finished_trials(study, running=True) if t.number < trial.number]
        if len(ahead) >= trials:
            raise optuna.TrialPruned(f"surplus: {len(ahead)} finished or running trials before it, "
                                     f"{trials} asked for")
        return objective(trial)

    def ended_as(trial: optuna.trial.FrozenTrial):
        return STOPPED_ATTR if STOPPED_ATTR in trial.user_attrs else trial.state

    ended: list = []                            # this run's trials (other workers' do not count here)
    start = time.perf_counter()
    while len(finished_trials(study)) < trials:
        failed, skipped = ended.count(TrialState.FAIL), ended.count(TrialState.PRUNED)
        if failed > max_failed or skipped > max_skipped:
            break
        if timeout is not None and time.perf_counter() - start > timeout:
            break
        if len(finished_trials(study, running=True)) >= trials:
            fail_stale_trials(study)
            time.sleep(poll)
            continue
        study.optimize(within_count, n_trials=1, catch=(Exception,),
                       callbacks=[*callbacks, lambda _, trial: ended.append(ended_as(trial))])
    failed, skipped = ended.count(TrialState.FAIL), ended.count(TrialState.PRUNED)
    if failed > max_failed:
        log.warning("study %r: %d trials failed in this run, so it stopped early", study.study_name, failed)
    if skipped > max_skipped:
        log.warning("study %r: %d trials in this run repeated another's parameters or were surplus, so it "
                    "stopped early (is the search space exhausted?)", study.study_name, skipped)
    return failed


def finished_trials(study: optuna.Study, *, running: bool = False) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards --trials: complete ones and those stopped on their first slice (not the
    repeats and surplus trials pruned unrun); with `running`, the running ones too."""
    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.state != TrialState.PRUNED or STOPPED_ATTR in t.user_attrs]


def prune_if_repeated(trial: optuna.Trial) -> None:
    """Prune `trial` unrun if its parameters (call after suggesting them all) equal a finished or running trial's.

    Workers whose samplers drew alike, or both enqueued the same seed trials, would otherwise run the
    same config twice.
    """
    for other in finished_trials(trial.study, running=True):
        if other.number != trial.number and other.params == trial.params:
            raise optuna.TrialPruned(f"repeats the parameters of trial {other.number}")


def _cells(e: Evaluation) -> str:
    return ", ".join(f"{s.kind} {s.value:.3f}" for s in e.scores)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not any(math.isnan(v) for v in t.values)]


def pick(study: optuna.Study, budget: Budget) -> tuple[optuna.trial.FrozenTrial, bool]:
    """The fastest complete trial within the budget; else the one closest to it (best retrieval, then loss)."""
    done = _complete(study)
    if not done:
        raise RuntimeError(f"study {study.study_name!r} has no complete trial")
    feasible = [t for t in done if budget.admits(tuple(t.values))]
    if feasible:
        return min(feasible, key=lambda t: t.values[2]), True
    return max(done, key=lambda t: (min(t.values[0], budget.min_retrieval), -t.values[1], -t.values[2])), False


def _finish(study, settings, loaded, hardware, fingerprint_hex, tiles, baseline, best: optuna.trial.FrozenTrial | None,
            ok: bool, confirmation: Confirmation, cache, start) -> TuneResult:
    """Cache and report the pick: `best` (from pick()) if it is within budget and beat all-dense when confirmed."""
    dense_latency = confirmation.dense
    if ok and confirmation.candidate is not None and confirmation.candidate.median_ms < dense_latency.median_ms:
        config, verdict, trial = DeltaConfig.from_dict(best.user_attrs["config"]), "within budget", best.number
        values = (best.values[0], best.values[1], confirmation.candidate.median_ms)
    else:
        # Nothing within the budget beats dense attention: the honest pick is dense.
        config, values, trial = presets.ALL_DENSE, (1.0, 0.0, dense_latency.median_ms), None
        verdict = "dense wins" if ok else "no trial met the budget"
    pareto = [{"trial": t.number, **dict(zip(OBJECTIVES, t.values)), "density": t.user_attrs.get("density"),
               "params": t.params} for t in sorted(study.best_trials, key=lambda t: t.values[2])]
    states = [STOPPED_ATTR if STOPPED_ATTR in t.user_attrs else t.state.name for t in study.get_trials(deepcopy=False)]
    meta = default_meta() | {"study": study.study_name, "trial": trial, "verdict": verdict,
                             "values": dict(zip(OBJECTIVES, values)), "dense_latency_ms": dense_latency.median_ms,
                             "search_latency_ms": best.values[2] if trial is not None else None,
                             "closest_trial": None if trial is not None or best is None else best.number,
                             "budget": asdict(settings.budget), "model": loaded.name, "length": settings.length,
                             "trials": {s: states.count(s) for s in set(states)}}
    path = cache.save(CacheEntry(hardware, fingerprint_hex, length_bucket(settings.length), config, meta))
    log.info("%s: %s saved to %s", verdict, "trial %d" % trial if trial is not None else "all-dense", path)
    return TuneResult(study.study_name, config, values, verdict, trial, pareto, baseline, tiles, str(path),
                      time.perf_counter() - start)


class _Stages:
    """Wall seconds of each stage of a tuning job, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


class _Bar:
    """A tqdm bar whose postfix is the best trial so far within the budget."""

    def __init__(self, total: int, budget: Budget, desc: str = "tuning") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="trial")
        self.budget = budget

    def start(self, complete: int) -> None:
        """The trials begin now, with `complete` already in the study (a resumed or shared one)."""
        self.bar.reset()                 # its clock and rate count this run's trials, not the stages before them
        self.bar.initial = self.bar.n = min(complete, self.bar.total)
        self.bar.refresh()

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state != optuna.trial.TrialState.COMPLETE and STOPPED_ATTR not in trial.user_attrs:
            return                       # a failed or repeated trial does not count towards --trials
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
