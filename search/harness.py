"""The accuracy harness: retrieval and continuation loss of a model under a DeltaConfig, with the real op.

Protocol (the paper's): the prompt is prefilled with the configured attention (Δ,
sparse, recompute or dense per layer), then everything after it is exact: greedy
decoding of the answer for retrieval tasks, and teacher-forced scoring of the
continuation over the prefilled cache.

Two engines run the same op, torch.ops.deltapass.delta_attention, with the same arguments:
  "interface" - the op is called from transformers' attention hook, layer by layer. Switching
                configs costs nothing, so the tuner uses it.
  "compiled"  - torch.compile(model, backend=deltapass.backend(config)): exactly what users run.
                Every config is a recompile. tests/test_harness.py checks that the engines agree.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from deltapass.config import DeltaConfig, SiteConfig
from deltapass.kernels import DeltaPlan, delta_attention, keeps_exactly_causal

from .models import LoadedModel
from .tasks import Task, answer_found

log = logging.getLogger("deltapass.search.harness")

ENGINES = ("interface", "compiled")
ANSWER_TOKENS = 12          # greedy tokens decoded for a retrieval answer (a 7-digit number is 8 tokens here)
_HOOK_NAME = "deltapass_harness"


# ---- the interface engine: the op called from transformers' attention hook --------------------------

@dataclass
class _Active:
    config: DeltaConfig | None = None
    site_prefix: str = "model.layers"


_ACTIVE = _Active()


def _hooked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Δ at prefill for the layer's configured mode; exact attention for everything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config, layer = _ACTIVE.config, getattr(module, "layer_idx", None)
    site = config.for_site(f"{_ACTIVE.site_prefix}.{layer}.self_attn", layer) if config is not None else None
    prefill = query.shape[2] == key.shape[2] and query.shape[2] > 1
    causal = attention_mask is None or bool(keeps_exactly_causal(
        attention_mask, "keep" if attention_mask.dtype == torch.bool else "additive"))
    if site is None or site.correction == "dense" or not prefill or not causal or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out = delta_attention(query, key, value, scale=scaling, **site.op_arguments())
    return out.transpose(1, 2).contiguous(), None


def _register_hook() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_HOOK_NAME, _hooked_attention)
    # SDPA's mask convention: no mask at all for plain causal prefill, so nothing is checked per layer.
    AttentionMaskInterface.register(_HOOK_NAME, sdpa_mask)


@contextlib.contextmanager
def configured(model: torch.nn.Module, config: DeltaConfig | None):
    """Run `model` with `config` through the attention hook (None: the model's own exact attention)."""
    _register_hook()
    previous = model.config._attn_implementation
    _set_attention(model, _HOOK_NAME)
    _ACTIVE.config = config
    try:
        yield model
    finally:
        _ACTIVE.config = None
        _set_attention(model, previous)


def _set_attention(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:                                   # older transformers read the name from the config per call
        model.config._attn_implementation = name


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

    @property
    def metric(self) -> str:
        return "loss" if self.kind == "continuation" else "accuracy"


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


# ---- running the tasks ------------------------------------------------------------------------------

class _Runner:
    """Prefill with the configured attention, then exact decode / scoring, for one engine."""

    def __init__(self, loaded: LoadedModel, config: DeltaConfig | None, engine: str) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
        self.model, self.config, self.engine = loaded.model, config, engine
        self.device = next(self.model.parameters()).device
        self._compiled = None

    def forward(self, ids: torch.Tensor, cache=None, prefill: bool = False):
        """Logits of every position; the prefill goes through the engine, later calls are exact."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        if prefill and self.config is not None and self.engine == "compiled":
            out = self._compiled_model()(input_ids=ids, past_key_values=cache, use_cache=True)
        elif prefill and self.config is not None:
            with configured(self.model, self.config):
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        else:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    def _compiled_model(self):
        if self._compiled is None:
            import deltapass

            torch._dynamo.reset()
            self._compiled = torch.compile(self.model, backend=deltapass.backend(self.config, inner="eager"),
                                           dynamic=False)
        return self._compiled

    @torch.no_grad()
    def answers(self, tasks: list[Task], tokenizer) -> list[bool]:
        ids = torch.stack([t.input_ids for t in tasks]).to(self.device)
        logits, cache = self.forward(ids, prefill=True)
        token = logits[:, -1:].argmax(-1)
        generated = [token]
        for _ in range(ANSWER_TOKENS - 1):
            logits, cache = self.forward(token, cache)
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
        texts = tokenizer.batch_decode(torch.cat(generated, dim=1).cpu(), skip_special_tokens=True)
        return [answer_found(text, task) for text, task in zip(texts, tasks)]

    @torch.no_grad()
    def losses(self, tasks: list[Task]) -> list[float]:
        prefix = torch.stack([t.input_ids for t in tasks]).to(self.device)
        target = torch.stack([t.continuation_ids for t in tasks]).to(self.device)
        logits, cache = self.forward(prefix, prefill=True)
        first = logits[:, -1:]
        rest, _ = self.forward(target[:, :-1], cache)
        logits = torch.cat([first, rest], dim=1).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return nll.mean(dim=1).tolist()


def evaluate(loaded: LoadedModel, config: DeltaConfig | None, tasks: list[Task], *, engine: str = "interface",
             batch_size: int = 8, label: str | None = None) -> Evaluation:
    """Scores of `config` (None: dense, the model's own attention) on `tasks`, one cell per (kind, length)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    runner = _Runner(loaded, config, engine)
    start = time.perf_counter()
    groups: dict[tuple[str, int], list[Task]] = {}
    for task in tasks:
        groups.setdefault((task.kind, task.length), []).append(task)
    evaluation = Evaluation(config=None if config is None else config.to_dict(), label=label or _label(config))
    layers = loaded.model.config.num_hidden_layers
    for (kind, length), group in groups.items():
        values: list[float] = []
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            if kind == "continuation":
                values += runner.losses(batch)
            else:
                values += [float(ok) for ok in runner.answers(batch, loaded.tokenizer)]
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


def prefill_latency_ms(loaded: LoadedModel, config: DeltaConfig | None, length: int, *, batch: int = 1,
                       repeats: int = 10) -> float:
    """Median wall time of one prefill forward at `length` tokens (interface engine), warm, random tokens."""
    model = loaded.model
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device,
                        generator=torch.Generator().manual_seed(length)) if device.type == "cpu" else \
        torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    context = configured(model, config) if config is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
        if device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(run, warmup=25, rep=max(50, repeats * 10), return_mode="median"))
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def _label(config: DeltaConfig | None) -> str:
    if config is None:
        return "dense"
    d = config.default
    label = f"{d.correction} s{d.sink}+w{d.window} g{d.gamma}"
    overrides = len(config.sites) + len(config.layers)
    return label + (f" +{overrides} layer overrides" if overrides else "")


def uniform(correction: str, sink: int = 64, window: int = 256, gamma: int = 64) -> DeltaConfig:
    """One mode on every layer."""
    return DeltaConfig(default=SiteConfig(sink=sink, window=window, gamma=gamma, correction=correction))
