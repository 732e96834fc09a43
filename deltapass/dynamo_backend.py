"""The "delta" torch.compile backend: decide each attention site, rewrite it, hand the graph to Inductor.

Which config a graph gets, in order: the one set by `DeltaBackend.using(...)` (the tuner), the
backend's own config, the tuned entry of the per-GPU cache for the graph's length bucket, else
the fallback (the paper's rule unless given). A cached entry is only ever applied inside the
length bucket it was tuned for: a graph compiled with dynamic shapes is guarded to that bucket,
so a prompt of another bucket recompiles and looks its own entry up.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch._dynamo
import torch.fx as fx

from .cache import HardwareKey, TunedConfigCache, bucket_lengths, length_bucket
from .config import DeltaConfig
from .decision import SiteDecision, decide_all
from .fingerprint import graph_fingerprint, hint, prompt_tokens, tensor_meta
from .rewrite import rewrite_as_slots, rewrite_graph
from .sites import Site, find_sites
from .switching import GraphedCall, Switchboard, can_slot

log = logging.getLogger("deltapass.backend")

# Compiled variants kept per graph for `using(...)`: each holds Inductor code (and CUDA-graph memory).
_VARIANTS_KEPT = 4


@dataclass(frozen=True)
class ConfigChoice:
    """The config a graph runs and where it came from."""

    config: DeltaConfig
    source: str                  # "tuning" (DeltaBackend.using), "argument", "cache" or "fallback"
    path: Path | None = None     # the cache entry file, for source "cache"
    detail: str = ""             # why no cache entry was used, for source "fallback"

    def describe(self) -> str:
        if self.source == "cache":
            return f"tuned config from {self.path}"
        if self.source == "fallback":
            return "fallback config" + (f" ({self.detail})" if self.detail else "")
        return {"tuning": "config set by DeltaBackend.using()", "argument": "config given to deltapass.backend()"}[
            self.source]


@dataclass
class GraphPlan:
    """What the backend does with one graph: each site's decision, the config, and where it came from."""

    sites: list[Site]
    decisions: list[SiteDecision]
    choice: ConfigChoice
    tokens: int | None           # the graph's prompt length, its keys (its hint, for dynamic shapes)
    max_tokens: int | None       # the most keys the compiled graph attends: static length or guarded bucket
    fingerprint: str | None      # model identity for the cache (deltapass.fingerprint)
    unmatched: list[str]         # config overrides that match no site of this graph


class DeltaBackend:
    """A torch.compile backend; build it once and reuse it: `torch.compile(m, backend=b)`.

    config: used for every graph (None: look up the per-GPU cache, else `fallback`).
    cache: a TunedConfigCache, True for the default one, False/None for none.
    switched: for a search over configs with using(): compile each static graph once with run-time
      site slots (deltapass.switching) instead of once per config; under CUDA graphs each config
      gets its own recording. Graphs it cannot slot (per-call mask checks, dynamic shapes) compile
      per config as usual.
    `plans` records, in order, what every graph compiled by this backend got.
    """

    def __init__(self, config: DeltaConfig | None = None, inner: str | Callable = "inductor",
                 cache: TunedConfigCache | None | bool = True, fallback: DeltaConfig | None = None,
                 switched: bool = False) -> None:
        if not (cache is None or isinstance(cache, (bool, TunedConfigCache))):
            raise ValueError(f"cache must be a TunedConfigCache, True, False or None, got cache={cache!r}")
        if config is not None and not isinstance(config, DeltaConfig):
            raise ValueError(f"config must be a DeltaConfig or None, got config={config!r}")
        if not isinstance(switched, bool):
            raise ValueError(f"switched must be True or False, got switched={switched!r}")
        self.switched = switched
        self.config = config
        self.fallback = fallback if fallback is not None else DeltaConfig()
        self.inner = inner
        self.cache = TunedConfigCache() if cache is True else (cache or None)
        self.plans: list[GraphPlan] = []
        self._override: DeltaConfig | None = None
        self._told: set[str] = set()            # one-time warnings already given by this backend

    @contextlib.contextmanager
    def using(self, config: DeltaConfig) -> Iterator["DeltaBackend"]:
        """Run this backend's compiled graphs with `config` inside the block: no re-trace per config.

        Each distinct set of site decisions is compiled once, when first run, and reused (the last
        few per graph are kept); with switched=True the graph was compiled once with run-time slots
        and only its decisions change. Needs graphs compiled with static shapes (dynamic=False): a
        dynamic graph cannot be recompiled outside Dynamo. Under CUDA graphs each variant has its
        own recording, so a switch never replays another config's launches.
        """
        if not isinstance(config, DeltaConfig):
            raise ValueError(f"config must be a DeltaConfig, got config={config!r}")
        previous, self._override = self._override, config
        try:
            yield self
        finally:
            self._override = previous

    def __call__(self, gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                 options: dict | None = None) -> Callable:
        """`mode` and `options` are torch.compile's (e.g. mode="reduce-overhead" for CUDA graphs); they go to Inductor."""
        inner = self._inner_compiler(mode, options)   # bad mode/options fail here, before any rewriting
        try:
            plan = self.plan(gm, example_inputs, with_override=False)   # what runs outside using()
            if self.switched and _is_static(gm) and can_slot(plan.sites):
                variants = _Slotted(self, gm, example_inputs, plan, *self._slot_compiler(mode, options))
            else:
                variants = _Variants(self, gm, example_inputs, inner, plan)
        except _DYNAMO_SIGNALS:
            raise    # Dynamo's own control flow (restart the analysis, skip the frame): never the pass's failure
        except Exception as exc:  # the user's model must still compile
            log.warning("the attention pass failed (%s: %s); compiling this graph untouched",
                        type(exc).__name__, exc)
            return inner(gm, example_inputs)
        self.plans.append(plan)
        replaced = sum(d.uses_delta for d in plan.decisions)
        log.info("graph %s: %d of %d attention sites use the Δ op (%s)", _graph_label(gm, plan), replaced,
                 len(plan.sites), plan.choice.describe())
        return variants

    # ---- planning: the one place a graph's config and decisions are made -------------------------

    def plan(self, gm: fx.GraphModule, example_inputs: list, *, with_override: bool = True) -> GraphPlan:
        """Find the sites, choose the config, decide each site. explain() calls this too.

        with_override: let a config set by using() win (False: the backend's own choice).
        """
        sites = find_sites(gm.graph)
        self._tell_about_grad(sites)
        replaceable = [s for s in sites if s.replaceable]
        tokens = prompt_tokens(sites) if replaceable else None
        fingerprint = graph_fingerprint(gm, example_inputs, sites) if replaceable else None
        choice, max_tokens = self._choose(sites, tokens, fingerprint, with_override)
        unmatched = _unmatched(choice.config, sites)
        if unmatched and choice.source in ("argument", "cache"):
            self._tell_once("unmatched:" + ";".join(unmatched),
                            "config overrides that match no attention site: %s", "; ".join(unmatched))
        return GraphPlan(sites, decide_all(sites, choice.config, max_tokens), choice,
                         None if tokens is None else hint(tokens), max_tokens, fingerprint, unmatched)

    def _choose(self, sites: list[Site], tokens, fingerprint: str | None,
                with_override: bool) -> tuple[ConfigChoice, int | None]:
        static = tokens if isinstance(tokens, int) else None
        if with_override and self._override is not None:
            return ConfigChoice(self._override, "tuning"), static
        if self.config is not None:
            return ConfigChoice(self.config, "argument"), static
        if self.cache is None or tokens is None:
            return ConfigChoice(self.fallback, "fallback", detail="no tuned-config cache"), static
        try:
            n = hint(tokens)
            device = tensor_meta(next(s.query for s in sites if s.replaceable)).device
            hardware = HardwareKey.current(device)
            max_tokens = static
            if static is None and self.cache.buckets(hardware, fingerprint):
                # Dynamic length and tuned entries exist: hold this graph to one length bucket, so a
                # prompt of another bucket recompiles and gets its own entry (or the fallback).
                lo, hi = bucket_lengths(length_bucket(n))
                if not (bool(tokens > lo) and bool(tokens <= hi)):
                    raise AssertionError(f"the length hint {n} lies outside its own bucket ({lo}, {hi}]")
                max_tokens = hi
            found = self.cache.resolve(hardware, fingerprint, n)
        except Exception as exc:  # a broken cache costs speed, never the compile
            log.warning("tuned-config lookup failed (%s: %s); using the %s", type(exc).__name__, exc,
                        self._fallback_name)
            return ConfigChoice(self.fallback, "fallback", detail=f"lookup failed: {exc}"), static
        self.cache.announce(found, n, self._fallback_name)
        if found.entry is None:
            return ConfigChoice(self.fallback, "fallback", detail=found.reason), max_tokens
        return ConfigChoice(found.entry.config, "cache", path=found.path), max_tokens

    @property
    def _fallback_name(self) -> str:
        return "paper defaults" if self.fallback == DeltaConfig() else "fallback config"

    def _tell_about_grad(self, sites: list[Site]) -> None:
        if any(s.reason.startswith("inputs require grad") for s in sites):
            self._tell_once("grad", "%d attention site(s) stay exact because autograd is recording; wrap "
                            "inference in torch.no_grad() or torch.inference_mode() to use Δ",
                            sum(s.reason.startswith("inputs require grad") for s in sites))

    def _tell_once(self, key: str, message: str, *args) -> None:
        if key not in self._told:
            self._told.add(key)
            log.warning(message, *args)

    # ---- compiling --------------------------------------------------------------------------------

    def _inner_compiler(self, mode: str | None, options: dict | None) -> Callable:
        """The backend that compiles the rewritten graph; torch.compile's mode/options apply to Inductor only."""
        from torch._dynamo.backends.registry import lookup_backend

        inductor_settings = (mode is not None and mode != "default") or bool(options)
        if inductor_settings and self.inner != "inductor":
            raise ValueError(f"mode={mode!r} and options={options!r} are Inductor settings, but this backend "
                             f"compiles with inner={self.inner!r}; use inner='inductor' or leave them unset")
        if inductor_settings:
            return _inductor_with(mode, options)
        return self.inner if callable(self.inner) else lookup_backend(self.inner)

    def _slot_compiler(self, mode: str | None, options: dict | None) -> tuple[Callable, bool]:
        """(compiler without CUDA graphs, whether torch.compile asked for CUDA graphs) for a slotted graph.

        The slots change what a recording would hold, so the backend records per config itself.
        """
        if self.inner != "inductor":
            return self._inner_compiler(mode, options), False
        import torch._inductor

        # list_mode_options(None) lists every mode; no mode means no settings of its own.
        settings = (dict(torch._inductor.list_mode_options(mode)) if mode else {}) | dict(options or {})
        cuda_graphs = bool(settings.pop("triton.cudagraphs", False))
        return _inductor_with(None, settings | {"triton.cudagraphs": False}), cuda_graphs


# Exceptions Dynamo raises through a backend to steer its own tracing, e.g. TensorifyScalarRestartAnalysis under
# dynamic=True: Dynamo retraces and calls the backend again. Swallowing one compiles the graph untouched.
_DYNAMO_SIGNALS = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame, torch._dynamo.exc.ResetRequired,
                   torch._dynamo.exc.RecompileError)


def _graph_label(gm: fx.GraphModule, plan: GraphPlan) -> str:
    """Which graph a log line is about: its first and last attention sites and its prompt length."""
    names = [s.name for s in plan.sites]
    where = "no attention site" if not names else names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
    return f"{where}, {plan.tokens} tokens" if plan.tokens is not None else where


def _unmatched(config: DeltaConfig, sites: list[Site]) -> list[str]:
    return config.unmatched([s.name for s in sites], sorted({s.layer for s in sites if s.layer is not None}))


def _decision_key(decisions: list[SiteDecision]) -> str:
    """Identity of a rewrite: two configs with equal decisions compile to the same graph."""
    return json.dumps([(d.action, None if d.config is None else asdict(d.config)) for d in decisions],
                      sort_keys=True)


class _Variants:
    """The compiled forms of one Dynamo graph, one per distinct set of site decisions.

    The plan's variant is compiled at once, inside Dynamo's compile (so dynamic shapes and guards
    work as usual). Configs set later with DeltaBackend.using() are compiled on first use.
    """

    def __init__(self, backend: DeltaBackend, gm: fx.GraphModule, example_inputs: list, inner: Callable,
                 plan: GraphPlan) -> None:
        self.backend, self.gm, self.example_inputs, self.inner, self.plan = backend, gm, example_inputs, inner, plan
        self.static = _is_static(gm)
        self.compiled: OrderedDict[str, Callable] = OrderedDict()
        self.planned = self._compile(plan.decisions)

    def _compile(self, decisions: list[SiteDecision]) -> Callable:
        key = _decision_key(decisions)
        if key not in self.compiled:
            graph = _copy_module(self.gm)
            # Sites of the copy: the decisions line up with them (same graph, same order).
            rewrite_graph(graph, find_sites(graph.graph), decisions)
            self.compiled[key] = self.inner(graph, self.example_inputs)
            while len(self.compiled) > _VARIANTS_KEPT:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return self.compiled[key]

    def _current(self) -> Callable:
        override = self.backend._override
        if override is None or not any(s.replaceable for s in self.plan.sites):
            return self.planned
        if not self.static:
            raise RuntimeError("DeltaBackend.using() needs graphs compiled with static shapes: "
                               "torch.compile(model, backend=b, dynamic=False)")
        return self._compile(decide_all(self.plan.sites, override, self.plan.max_tokens))

    def __call__(self, *args):
        # Dynamo calls this unboxed (it has no _boxed_call), exactly as it calls the inner compiler's result.
        return self._current()(*args)


class _Slotted:
    """One Dynamo graph compiled once with run-time site slots; using() sets the slots' decisions.

    With CUDA graphs on, each distinct set of decisions gets its own recording on first use (the
    last one is kept: a recording holds the activations of a whole forward).
    """

    def __init__(self, backend: DeltaBackend, gm: fx.GraphModule, example_inputs: list, plan: GraphPlan,
                 compile_graph: Callable, cuda_graphs: bool) -> None:
        self.backend, self.plan, self.cuda_graphs = backend, plan, cuda_graphs
        self.board = Switchboard(plan.decisions)
        graph = _copy_module(gm)
        rewrite_as_slots(graph, find_sites(graph.graph), self.board.number)
        self.compiled = compile_graph(graph, example_inputs)
        self.recording: tuple[str, GraphedCall] | None = None
        self._decided: tuple[DeltaConfig | None, list[SiteDecision]] = (None, plan.decisions)

    def _decisions(self) -> list[SiteDecision]:
        override = self.backend._override
        if override is not self._decided[0]:
            decisions = self.plan.decisions if override is None else decide_all(self.plan.sites, override,
                                                                                self.plan.max_tokens)
            self._decided = (override, decisions)
        return self._decided[1]

    def __call__(self, *args):
        decisions = self._decisions()
        self.board.set(decisions)
        if not (self.cuda_graphs and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)):
            return self.compiled(*args)
        key = _decision_key(decisions)
        if self.recording is None or self.recording[0] != key:
            self.recording = None                 # free the old recording's memory before making the new one
            self.recording = (key, GraphedCall(self.compiled, args))
        return self.recording[1](*args)


def _is_static(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor)
                                               and any(isinstance(d, torch.SymInt) for d in value.shape)):
            return False
    return True


def _inductor_with(mode: str | None, options: dict | None) -> Callable:
    """Inductor with torch.compile's mode and options applied exactly as torch.compile applies them."""
    if mode is not None and not isinstance(mode, str):
        raise ValueError(f"mode must be a string such as 'reduce-overhead', got mode={mode!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict of Inductor config values, got options={options!r}")
    try:
        return torch._TorchCompileInductorWrapper(mode, dict(options or {}), None)
    except RuntimeError as exc:   # torch names the unknown mode or option; say which argument carried it
        raise ValueError(f"Inductor rejected mode={mode!r} / options={options!r}: {exc}") from exc


def _copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A node-for-node copy to rewrite (metadata shared), so a failed rewrite leaves the original intact.

    It keeps what Dynamo attaches for the compilers behind it: the module's meta and parameter sources
    and each placeholder's source. From them Inductor learns which inputs are parameters with fixed
    addresses; without them CUDA graphs copy every parameter into the recording on each replay.
    """
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    for old, new in copied.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    module = fx.GraphModule(gm, graph)
    module.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        module._param_name_to_source = gm._param_name_to_source
    return module


def backend(config: DeltaConfig | None = None, inner: str | Callable = "inductor",
            cache: TunedConfigCache | None | bool = True, fallback: DeltaConfig | None = None,
            switched: bool = False) -> DeltaBackend:
    """The configurable form: `torch.compile(model, backend=deltapass.backend(config))`."""
    return DeltaBackend(config, inner, cache, fallback, switched)


def delta_backend(gm: fx.GraphModule, example_inputs: list, *, mode: str | None = None,
                  options: dict | None = None) -> Callable:
    """Entry point of `torch.compile(model, backend="delta")`: the tuned config from the cache, else the defaults.

    torch.compile's `mode` and `options` reach Inductor: `torch.compile(model, backend="delta",
    mode="reduce-overhead")` runs the rewritten model under CUDA graphs.
    """
    return _ENTRY_POINT(gm, example_inputs, mode=mode, options=options)


# One backend object behind the "delta" entry point: Dynamo re-traces a frame whenever the backend
# object changes, so a fresh one per call would recompile every graph (and hit its recompile limit).
_ENTRY_POINT = DeltaBackend()
