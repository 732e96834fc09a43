"""The accuracy and latency harness: what the compiled model users run scores and costs under a config.

One CompiledModel per model: torch.compile through one DeltaBackend, and `DeltaBackend.using(config)`
switches configs between evaluations without re-tracing. Two engines:
  switched=False - each distinct set of site decisions is lowered once by Inductor: scores and
                   latencies come from exactly the graph `torch.compile(model,
                   backend=deltapass.backend(config))` builds (tens of seconds per config);
  switched=True  - the graph is lowered once with run-time site slots (deltapass.switching) that
                   run the same kernels per the current config (the tuner's search); its latencies
                   rank configs, and the tuner confirms its pick on the first engine.

Protocol (the paper's): the prompt is prefilled by the compiled model with the config; everything
after it is exact: greedy decoding of the answer for retrieval tasks, and teacher-forced scoring of
the continuation over the prefilled cache. The dense baseline is the all-dense config (SDPA
is_causal at every proven-causal site), compiled the same way.
"""
from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from deltapass import presets
from deltapass.config import DeltaConfig
from deltapass.dynamo_backend import DeltaBackend
from deltapass.kernels import DeltaPlan

from .models import LoadedModel
from .tasks import Task, answer_found

log = logging.getLogger("deltapass.search.harness")

ANSWER_TOKENS = 12          # greedy tokens decoded for a retrieval answer (a 7-digit number is 8 tokens here)


# ---- what one task set measures ------------------------------------------------------------------

@dataclass(frozen=True)
class Score:
    """One (kind, length) cell: retrieval accuracy or continuation loss over n samples, with a 95% interval."""

    kind: str
    length: int
    n: int
    value: float
    low: float
    high: float


@dataclass
class Evaluation:
    config: dict | None                 # DeltaConfig.to_dict(), None = dense
    label: str
    scores: list[Score] = field(default_factory=list)
    density: dict[int, float] = field(default_factory=dict)     # length -> attended fraction of causal pairs
    seconds: float = 0.0

    def score(self, kind: str, length: int | None = None) -> Score | None:
        """One cell, or for length None the sample-weighted pool over every length of that kind."""
        cells = [s for s in self.scores if s.kind == kind and (length is None or s.length == length)]
        if not cells:
            return None
        if len(cells) == 1:
            return cells[0]
        n = sum(c.n for c in cells)
        value = sum(c.value * c.n for c in cells) / n
        return Score(kind, 0, n, value, *(_wilson(value, n) if kind != "continuation" else (math.nan, math.nan)))

    def to_dict(self) -> dict:
        return {"label": self.label, "config": self.config, "scores": [asdict(s) for s in self.scores],
                "density": {str(k): v for k, v in self.density.items()}, "seconds": self.seconds}


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at p = 0 or 1 and small n."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _mean_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def attention_density(config: DeltaConfig | None, layers: int, length: int) -> float:
    """Fraction of the causal query-key pairs the config computes, averaged over layers (dense = 1)."""
    if config is None:
        return 1.0
    total = length * (length + 1) / 2
    fractions = []
    for layer in range(layers):
        site = config.for_site(f"model.layers.{layer}.self_attn", layer)
        if site.correction == "dense":
            fractions.append(1.0)
            continue
        sparse, dense = DeltaPlan(length, site.sink, site.window, site.gamma, site.correction).attended_keys()
        fractions.append(min(1.0, (sparse + dense) / total))
    return sum(fractions) / layers


# ---- the compiled model ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Latency:
    """Warm prefill wall times in ms: the median and the spread (10th-90th percentile) over `runs`."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    cuda_graphs: bool


class CompiledModel:
    """The model compiled once through a switchable delta backend; every config runs through it.

    mode: torch.compile's mode; default "reduce-overhead" (CUDA graphs) on CUDA, plain on CPU.
    switched: one lowering with run-time site slots for every config (see the module docstring).
    inner: the compiler behind the pass ("eager" skips Inductor's C++ builds on a CPU, for checking).
    """

    def __init__(self, loaded: LoadedModel, *, mode: str | None = None, switched: bool = False,
                 inner: str = "inductor") -> None:
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.mode = mode
        self.backend = DeltaBackend(cache=False, fallback=presets.ALL_DENSE, switched=switched, inner=inner)
        # transformers 5.25 renamed the forward's KV-cache keyword past_key_values to cache (the old name warns).
        forward = inspect.signature(loaded.model.forward).parameters
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"
        self.compiled = torch.compile(loaded.model, backend=self.backend, mode=None if mode == "default" else mode,
                                      dynamic=False)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, config: DeltaConfig | None):
        """(last-position logits [B, 1, V], KV cache) of the compiled prefill under config (None: all dense)."""
        from transformers import DynamicCache

        with self.backend.using(config or presets.ALL_DENSE), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            out = self.compiled(input_ids=ids, use_cache=True, logits_to_keep=1,
                                **{self._cache_keyword: DynamicCache()})
        if not self.backend.plans:
            # The pass failed and the graph was compiled untouched (the warning above says why): every
            # config would run dense, and a search would rank noise.
            raise RuntimeError("the attention pass compiled no graph of this model; see the warning above")
        # Under CUDA graphs the outputs live in the graph's memory until its next replay: copy the logits
        # (the cache is read before any replay and then dropped).
        return out.logits.clone(), _cache_of(out)

    @torch.no_grad()
    def exact(self, ids: torch.Tensor, cache):
        """Logits of every position of ids, with the model's own attention over the cache (exact)."""
        out = self.loaded.model(input_ids=ids, use_cache=True, **{self._cache_keyword: cache})
        return out.logits, _cache_of(out)

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, config: DeltaConfig | None, new_tokens: int) -> torch.Tensor:
        """[B, new_tokens] greedy tokens: the compiled prefill under config, then exact decoding over its cache."""
        logits, cache = self.prefill(ids, config)
        token = logits[:, -1:].argmax(-1)
        generated = [token]
        for _ in range(new_tokens - 1):
            logits, cache = self.exact(token, cache)
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
        return torch.cat(generated, dim=1)

    @torch.no_grad()
    def latency(self, config: DeltaConfig | None, length: int, *, batch: int = 1, repeats: int = 20) -> Latency:
        """Warm prefill of `length` random tokens, the call the harness scores, timed as users would run it."""
        model = self.loaded.model
        generator = torch.Generator().manual_seed(length)
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(self.device)
        run = lambda: self.prefill(ids, config)  # noqa: E731
        for _ in range(3):               # compile, CUDA-graph warm-up and recording
            run()
        times = [_timed_ms(run, self.device) for _ in range(repeats)]
        q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
        return Latency(statistics.median(times), q[0], q[-1], len(times), self.mode == "reduce-overhead")


def _cache_of(out):
    """The KV cache a forward returned: `cache` since transformers 5.25, `past_key_values` before."""
    cache = out.get("cache")
    return cache if cache is not None else out.past_key_values


def _timed_ms(fn, device: torch.device) -> float:
    """Wall time of one call in ms: CUDA events around it on a GPU (host gaps count), perf_counter on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


# ---- running the tasks ------------------------------------------------------------------------------

def _answers(model: CompiledModel, config: DeltaConfig | None, tasks: list[Task]) -> list[bool]:
    ids = torch.stack([t.input_ids for t in tasks]).to(model.device)
    generated = model.greedy(ids, config, ANSWER_TOKENS)
    texts = model.loaded.tokenizer.batch_decode(generated.cpu(), skip_special_tokens=True)
    return [answer_found(text, task) for text, task in zip(texts, tasks)]


def _losses(model: CompiledModel, config: DeltaConfig | None, tasks: list[Task]) -> list[float]:
    prefix = torch.stack([t.input_ids for t in tasks]).to(model.device)
    target = torch.stack([t.continuation_ids for t in tasks]).to(model.device)
    first, cache = model.prefill(prefix, config)
    rest, _ = model.exact(target[:, :-1], cache)
    logits = torch.cat([first, rest], dim=1).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return nll.mean(dim=1).tolist()


def evaluate(model: CompiledModel, config: DeltaConfig | None, tasks: list[Task], *, batch_size: int = 8,
             label: str | None = None) -> Evaluation:
    """Scores of `config` (None: all dense) on `tasks`, one cell per (kind, length)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    start = time.perf_counter()
    groups: dict[tuple[str, int], list[Task]] = {}
    for task in tasks:
        groups.setdefault((task.kind, task.length), []).append(task)
    evaluation = Evaluation(config=None if config is None else config.to_dict(),
                            label=label or presets.label(config))
    layers = model.loaded.model.config.num_hidden_layers
    for (kind, length), group in groups.items():
        values: list[float] = []
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            if kind == "continuation":
                values += _losses(model, config, batch)
            else:
                values += [float(ok) for ok in _answers(model, config, batch)]
        if kind == "continuation":
            mean, low, high = _mean_interval(values)
        else:
            mean = statistics.fmean(values)
            low, high = _wilson(mean, len(values))
        evaluation.scores.append(Score(kind, length, len(values), mean, low, high))
        evaluation.density[length] = attention_density(config, layers, length)
    evaluation.seconds = time.perf_counter() - start
    log.info("%s: %s in %.1f s", evaluation.label,
             ", ".join(f"{s.kind}@{s.length}={s.value:.3f}" for s in evaluation.scores), evaluation.seconds)
    return evaluation
