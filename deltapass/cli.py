"""The `deltapass` command line: the library logs, this module prints.

Nothing heavy is imported at module level (torch, transformers, optuna are imported by the
command that needs them), so `deltapass --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Callable

from . import defaults

DESCRIPTION = "Sparse + Δ-corrected attention for long-context LLM prefill: inspect, measure, tune and time it."

# One line per subcommand: the parser's help=, description= and the top-level epilog all read it.
SUMMARIES = {
    "explain": "which attention sites of a model the pass replaces, and why not",
    "accuracy": "accuracy table of attention configs on pass-key, multi-key and continuation tasks",
    "tune": "tune tiles, sparsity and per-layer corrections on this device; cache the pick",
    "show": "list the cached tuned configs and whether this machine can use them",
    "export": "copy one cached tuned config to a file, to share it",
    "import": "add a tuned config file to the cache, validated as the cache reads it",
    "bench": "prefill latency: dense vs the tuned config vs the paper's rule",
}

# Import names of the `search` extra (pyproject.toml); every command but `show` loads a model through it.
SEARCH_EXTRA_MODULES = ("transformers", "gguf", "optuna", "tqdm", "matplotlib")
NEEDS_SEARCH_EXTRA = ("explain", "accuracy", "tune", "bench")

# What a command raises for a bad argument, file or storage; its message names what to fix. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError)

# Why `deltapass tune` does not run on a CPU unless asked to (measured on a 2-core CPU shared with other jobs: the
# embedded SmolLM2's dense baseline alone, 3 tasks and 23 timed prefills at 2048 tokens, took 2.7 CPU-minutes,
# and every trial costs as much again, before Inductor's C++ builds of the confirmation).
CPU_REFUSAL = ("tuning is a GPU job: on a CPU the Δ op runs its exact float32 reference and every trial prefills "
               "the model about 50 times (24 task prompts at the default --samples 8, then 23 timed runs), so one "
               "trial of the embedded SmolLM2 at 2048 tokens takes minutes and the default 64 trials at 8192 tokens "
               "would take many hours, "
               "and the latencies it ranks say nothing about a GPU; on one GPU (--device cuda) 64 trials at "
               "16K-32K take 6-9 minutes (docs/TUNING.md). To check the plumbing here, run a smoke test: "
               "deltapass tune --device cpu --cpu-smoke --length 1024 --trials 2 --samples 1 --no-tiles "
               "--no-calibration")
# Study and report names become file names in the report folder: one safe name, never a path.
FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _finite_float(low: float | None = None, high: float | None = None, *,
                  above: bool = False) -> Callable[[str], float]:
    """A float parser: finite (no nan, no inf), >= low (> low with `above`), <= high."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value
    return parse


def _file_stem(text: str) -> str:
    """A study or report name: letters, digits, '.', '_', '+', '-' (not first), no '..'; it names files."""
    if not FILE_STEM.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(f"must be 1-200 letters, digits, '.', '_', '+' or '-', starting with a "
                                         f"letter or digit, without '..' (it names report files), got {text!r}")
    return text


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's lines; appends "(default: X)" unless the help already says it or X is unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a .gguf file or a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--context", type=_int_at_least(1), default=None,
                        help="context length to run at; past the model's native length its RoPE gets YaRN "
                             "scaling (a model folder's own rope scaling is kept); default: the native length")


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _missing_search_modules() -> list[str]:
    return [name for name in SEARCH_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def _load_config(path: str | None):
    from .config import DeltaConfig

    return DeltaConfig.from_json(path) if path else None


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def _site_label(site) -> str:
    """A SiteConfig as the accuracy tables name it: "dense" or "delta s64+w256 g64"."""
    if site.correction == "dense":
        return "dense"
    return f"{site.correction} s{site.sink}+w{site.window} g{site.gamma}"


def _layer_runs(config, layers: int | None = None) -> str:
    """Per-layer corrections as runs of consecutive layers: "0-9 dense, 10-14 none s32+w768 g16, ..."."""
    if not config.layers:
        return "every layer: " + _site_label(config.default)
    last = max(config.layers) if layers is None else layers - 1
    runs: list[list] = []                         # [first, last, label]
    for layer in range(last + 1):
        label = _site_label(config.layers.get(layer, config.default))
        if runs and runs[-1][2] == label and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, label])
    return ", ".join(f"{a}-{b} {label}" if a != b else f"{a} {label}" for a, b, label in runs)


def report_dir(out: str | None) -> Path:
    """--out, else the reports/ folder of the deltapass cache dir (not the current directory)."""
    from .cache import cache_dir

    return Path(out) if out else cache_dir() / "reports"


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _step(message: str) -> None:
    """One line before a phase that can take a while, so no command sits silent."""
    print(f"... {message}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    from deltapass.search.models import load_model

    _step(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} on {args.device}")
    return load_model(args.model, device=args.device, context=args.context)


def explain_command(args: argparse.Namespace) -> int:
    """Trace the model at a prompt length and print every attention site's verdict."""
    import torch


    from .explaining import explain

    config = _load_config(args.config)          # a bad file fails now, not after the model loads
    loaded = _load(args)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    _step(f"tracing {args.tokens} tokens through the model as torch.compile would (one eager forward)")
    with torch.no_grad():                      # the grad mode of inference, which the report depends on
        report = explain(loaded.model, ids, config=config)
    print(f"{loaded.name} ({loaded.source}), {args.tokens} tokens")
    print(report)
    if report.sites and not report.replaced:
        reasons = sorted({s.reason for s in report.sites})
        print(f"nothing changes at {args.tokens} tokens: {reasons[0]}"
              + (f" (and {len(reasons) - 1} other reason(s) above)" if len(reasons) > 1 else "")
              + ("; a longer --tokens shows the Δ op" if any("covers all" in r for r in reasons) else ""))
    if args.verbose:
        for site in report.sites:
            for note in site.notes:
                print(f"  {site.name}: {note}")
    return 0


def accuracy_command(args: argparse.Namespace) -> int:
    """The accuracy table: dense, sparse only and every correction mode on the RULER-style tasks."""
    from deltapass.search import accuracy

    from . import presets
    from .config import SiteConfig

    out = report_dir(args.out)
    rule = SiteConfig(sink=presets.SMALL.sink if args.sink is None else args.sink,
                      window=presets.SMALL.window if args.window is None else args.window,
                      gamma=presets.SMALL.gamma if args.gamma is None else args.gamma)
    loaded = _load(args)
    layers = loaded.model.config.num_hidden_layers
    sweep = accuracy.Sweep(sink=rule.sink, window=rule.window)
    if args.configs == "standard":
        configs = accuracy.standard_configs(layers, sweep)
    else:
        configs = []
        for item in args.configs.split(","):
            if item == "dense":
                configs.append(("dense", None))
            elif item in ("none", "delta", "recompute", "tail"):
                config = presets.uniform(rule, item)
                configs.append((presets.label(config), config))
            else:                                   # a DeltaConfig JSON file
                from .config import DeltaConfig

                configs.append((item.rsplit("/", 1)[-1].removesuffix(".json"), DeltaConfig.from_json(item)))
        if not any(c is None for _, c in configs):
            configs.insert(0, ("dense", None))

    def progress(label, evaluation, latency):
        cells = "  ".join(f"{s.kind}@{s.length}={s.value:.3f}" for s in evaluation.scores)
        timing = f"{evaluation.seconds:.0f} s" + (f", prefill {latency:.1f} ms" if latency else "")
        print(f"{label:<40} {cells}  ({timing})", flush=True)

    summaries = accuracy.run(loaded, lengths=tuple(args.lengths), samples=args.samples, configs=configs,
                             out_dir=str(out), name=args.name, batch_size=args.batch_size, seed=args.seed,
                             latency=not args.no_latency, progress=progress)
    print((out / f"{args.name}.md").read_text())
    stem = out / args.name
    print(f"wrote {stem}.md, {stem}.json and {stem}.png ({_plural(len(summaries), 'config')})")
    return 0


def tune_command(args: argparse.Namespace) -> int:
    """Tuning jobs on one device, one per length: tiles, then sparsity and per-layer corrections; picks cached."""
    from deltapass.search import tune
    from deltapass.search.space import SparsitySpace

    import optuna

    from deltapass.search.storage import check_storage

    from .cache import TunedConfigCache

    # What can fail in a second fails before the model loads and the study runs.
    if args.length is not None and args.lengths is not None:
        raise ValueError(f"give --length or --lengths, not both, got --length {args.length} and --lengths "
                         f"{' '.join(map(str, args.lengths))}")
    lengths = args.lengths or [args.length or defaults.TUNE_LENGTH]
    TunedConfigCache().check_writable()
    check_storage(args.storage)
    if args.device.split(":")[0] == "cpu" and not args.cpu_smoke:
        raise ValueError(CPU_REFUSAL)
    settings = tune.TuneSettings(length=lengths[0], trials=args.trials, samples=args.samples,
                                 batch_size=args.batch_size, seed=args.seed, task_seed=args.task_seed,
                                 study=args.study, storage=args.storage,
                                 timeout=args.timeout, tile_trials=not args.no_tiles,
                                 calibrate=not args.no_calibration, prune=not args.no_pruning,
                                 space=SparsitySpace(max_window_density=args.max_window_density),
                                 budget=_budget(tune.Budget(), args.min_retrieval, args.max_loss_delta))
    tune.check_lengths(lengths)
    optuna.logging.set_verbosity(optuna.logging.WARNING)     # the progress bar reports each trial
    loaded = _load(args)
    for length, result in zip(lengths, tune.tune_lengths(loaded, settings, lengths)):
        _report_tune(args, loaded, length, result)
    return 0


def _report_tune(args: argparse.Namespace, loaded, length: int, result) -> None:
    """One tuning job's report files and summary lines."""
    import json

    from deltapass.search import tune
    from deltapass.search.report import pareto_plot, pareto_table
    from deltapass.search.storage import load_or_create_study, open_storage

    out = report_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result.study_name
    Path(f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=1, default=float))
    study = load_or_create_study(result.study_name, open_storage(args.storage), tune.DIRECTIONS)
    dense_ms = result.baseline["dense_latency"]["median_ms"]
    search_dense_ms = result.baseline["search_dense_latency"]["median_ms"]
    pareto_plot(study, f"{stem}.png", f"{loaded.name} at {length} tokens: {result.study_name}", search_dense_ms)
    if len(args.lengths or ()) > 1:
        print(f"\n== {length} tokens ==")
    print(pareto_table(result.pareto))
    print(f"(search latencies: one graph with run-time site slots; all-dense there {search_dense_ms:.2f} ms)")
    r, dl, ms = result.values
    timing = "CUDA graphs" if result.baseline["dense_latency"]["cuda_graphs"] else \
        "no CUDA graphs; on a CPU the op runs its exact float32 reference, so CPU latencies say nothing of GPU speed"
    checked = result.confirmation or {}
    if result.trial is None:
        candidate = checked.get("candidate")
        tried = (f"; candidate trial {checked['trial']} took {candidate['median_ms']:.2f} ms"
                 if candidate else "")
        print(f"\npicked: all-dense ({result.verdict}); dense prefill {dense_ms:.2f} ms ({timing}){tried}")
    else:
        print(f"\npicked: trial {result.trial}, retrieval {r:.2f} of dense, loss {dl:+.4f} nats, prefill "
              f"{ms:.2f} ms vs all-dense {dense_ms:.2f} ms ({dense_ms / ms:.2f}x, {timing}, both compiled as "
              f"users compile them): {result.verdict}")
    if result.calibration is not None:
        from deltapass.search.calibrate import Calibration, plot

        calibration = Calibration.from_dict(result.calibration)
        calibration.save(f"{stem}-calibration.json")
        plot(calibration, f"{stem}-calibration.png")
    print(f"cached: {result.cache_path}\nreport: {stem}.json, {stem}.png ({result.seconds:.0f} s)")


def _budget(default, min_retrieval: float | None, max_loss_delta: float | None):
    """The preset budget with the options the user gave."""
    return type(default)(default.min_retrieval if min_retrieval is None else min_retrieval,
                         default.max_loss_delta if max_loss_delta is None else max_loss_delta)


def show_command(args: argparse.Namespace) -> int:
    """Every cached tuned config, and whether this machine's devices, torch, Triton and kernels can use it."""
    from .cache import TunedConfigCache, local_hardware

    cache = TunedConfigCache()
    here = local_hardware()
    entries = cache.entries(here)
    print(f"cache: {cache.config_dir} ({_plural(len(entries), 'entry', 'entries')})")
    print(f"here: {', '.join(dict.fromkeys(key.device_label for key in here))}; torch {here[0].torch_version}, "
          f"triton {here[0].triton_version}, kernels {here[0].kernels}")
    for path, entry, status in entries:
        print(f"  {path.name}: {status}")
        if entry is None:
            continue
        hw, meta, config = entry.hardware, entry.meta, entry.config
        overrides = len(config.layers) + len(config.sites)
        print(f"    tuned on {hw.device_name} ({hw.capability}), torch {hw.torch_version}, "
              f"triton {hw.triton_version}, kernels {hw.kernels}")
        print(f"    model {meta.get('model', '?')}, length bucket {entry.bucket} tokens, "
              f"study {meta.get('study', '?')}")
        print(f"    default: {_site_label(config.default)}; {_plural(overrides, 'override')}")
        if config.layers:
            print(f"    layers: {_layer_runs(config)}")
        for name, site in sorted(config.sites.items()):
            print(f"    site {name}: {_site_label(site)}")
        values = meta.get("values")
        if isinstance(values, dict) and values:
            print("    values: " + ", ".join(f"{k} {_format_value(v)}" for k, v in values.items()))
    return 0


def export_command(args: argparse.Namespace) -> int:
    """One cache entry, as `show` names it, to a file: the same JSON, checked as the cache reads it."""
    from .cache import TunedConfigCache, read_entry

    cache = TunedConfigCache()
    source = cache.config_dir / args.entry
    if Path(args.entry).name != args.entry or not source.is_file():
        known = ", ".join(p.name for p, _, _ in cache.entries()) or "none"
        raise ValueError(f"entry {args.entry!r} is not in {cache.config_dir} (its entries: {known})")
    entry = _checked_entry(read_entry, source, regular_only=True)
    target = Path(args.file or args.entry)
    target.write_text(entry.to_json())
    print(f"exported {source} to {target} (tuned on {entry.hardware.device_label}, length bucket {entry.bucket})")
    return 0


def import_command(args: argparse.Namespace) -> int:
    """A tuned entry file into the cache, if the cache would read it; an entry for another device is kept (show
    says so)."""
    from .cache import TunedConfigCache, local_hardware, read_entry, usable_status

    entry = _checked_entry(read_entry, args.file)
    cache = TunedConfigCache()
    replaced = (cache.config_dir / entry.file_name).exists()
    path = cache.save(entry)
    status = usable_status(entry, local_hardware())
    print(f"{'replaced' if replaced else 'imported'} {path}: {status}")
    return 0


def _checked_entry(read, path, **kwargs):
    """read(path) or a ValueError naming the file and what is wrong with it (a corrupt or stale entry)."""
    from .cache import UnusableEntry

    try:
        return read(path, **kwargs)
    except UnusableEntry as exc:
        raise ValueError(f"entry file {str(path)!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"entry file {str(path)!r}: not UTF-8 text ({exc.reason})") from None


def bench_command(args: argparse.Namespace) -> int:
    """Prefill latency of a model as compiled: all-dense vs the tuned entry (or --config) vs the paper's rule."""
    import torch

    from deltapass.search.harness import CompiledModel

    from . import presets
    from .cache import HardwareKey, TunedConfigCache
    from .explaining import fingerprint

    tuned = _load_config(args.config)           # a bad file fails now, not after the model loads
    loaded = _load(args)
    paper = presets.uniform(presets.PAPER)
    configs = {"all-dense (SDPA is_causal)": presets.ALL_DENSE, f"paper rule ({presets.label(paper)})": paper}
    if tuned is not None:
        configs[f"--config {args.config}"] = tuned
    else:
        with torch.no_grad():
            model_id = fingerprint(loaded.model)
        found = TunedConfigCache().resolve(HardwareKey.current(args.device), model_id, args.tokens)
        if found.entry is not None:
            configs[f"tuned ({found.path.name})"] = found.entry.config
        else:
            print(found.reason)
    cpu = args.device == "cpu"
    # On a CPU the Δ op runs the exact reference: Inductor's C++ builds there would take minutes and time nothing
    # the GPU runs, so the graphs run eagerly and a few repeats suffice.
    model = CompiledModel(loaded, inner="eager" if cpu else "inductor")
    repeats = 5 if cpu else 20
    print(f"{loaded.name} on {args.device}, {args.tokens} tokens, torch.compile mode {model.mode!r}"
          f"{' (eager graphs)' if cpu else ''}; median of {repeats} warm runs [10th-90th percentile]")
    print(f"Δ sites run {_kernels_line(loaded, args.device, configs)}")
    if cpu:
        print("on a CPU the Δ op runs the exact float32 reference of the rule, for checking: these timings say "
              "nothing about GPU speed")
    dense = None
    for label, config in configs.items():
        _step(f"compiling and timing {label}")
        t = model.latency(config, args.tokens, repeats=repeats)
        dense = dense or t
        note = ""
        if config.default.correction != "dense" and args.tokens <= config.default.sink + config.default.window:
            note = "  (sink + window cover the prompt: exact attention)"
        print(f"{label:<50} {t.median_ms:9.2f} ms [{t.p10_ms:.2f}-{t.p90_ms:.2f}]   {_versus(t, dense)}{note}",
              flush=True)
    return 0


def _versus(t, dense) -> str:
    """t against all-dense: a ratio only when the two spreads (10th-90th percentile) do not overlap."""
    if t is dense:
        return "(baseline)"
    if t.p90_ms >= dense.p10_ms and t.p10_ms <= dense.p90_ms:
        return "no difference from all-dense (the spreads overlap)"
    return f"{dense.median_ms / t.median_ms:5.2f}x all-dense"


def _kernels_line(loaded, device: str, configs: dict) -> str:
    """Which kernels the model's Δ sites run here, and why not the Hopper ones (kernels.dispatch.kernels_for)."""
    import torch

    from .kernels import LaunchConfig
    from .kernels.dispatch import kernels_for

    model_config = loaded.model.config
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    launch = next((c.default.launch for c in configs.values() if c.default.correction != "dense"), {})
    dtype = next(loaded.model.parameters()).dtype
    return kernels_for(torch.device(device), dtype, head_dim, LaunchConfig.from_kwargs(dict(launch)))


def _subcommand(sub, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, prog=f"deltapass {name}", help=SUMMARIES[name],
                          description=SUMMARIES[name][0].upper() + SUMMARIES[name][1:] + ".",
                          formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, SUMMARIES))
    epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {line}" for name, line in SUMMARIES.items()) + \
        "\n\n'deltapass COMMAND --help' lists a command's options. Every command but show, export and import " \
        "needs the search extra:\npip install 'deltapass[search]'"
    parser = _Parser(prog="deltapass", usage="%(prog)s [--log-level LEVEL] COMMAND [options]",
                                     description=DESCRIPTION, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="level of deltapass's own log lines (INFO says what the pass and the cache do; "
                             "DEBUG also the traceback of an error)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)  # epilog lists them

    p = _subcommand(sub, "explain")
    _model_arguments(p)
    p.add_argument("--tokens", type=_int_at_least(1), default=8192,
                   help="prompt length to trace (the default is one where the paper's config is sparse)")
    p.add_argument("--config", default=None, help="a DeltaConfig JSON file (default: the paper's config)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each site's notes")

    p = _subcommand(sub, "accuracy")
    _model_arguments(p)
    p.add_argument("--lengths", type=_int_at_least(1), nargs="+", default=[2048, 4096, 8192],
                   help="prompt lengths to test")
    p.add_argument("--samples", type=_int_at_least(1), default=20, help="tasks per kind and length")
    p.add_argument("--configs", default="standard",
                   help="'standard' (the full sweep) or a comma list of dense, none, delta, recompute, CONFIG.json")
    p.add_argument("--sink", type=int, default=None, help="sink tokens of the listed modes (default: the small rule's)")
    p.add_argument("--window", type=int, default=None,
                   help="window tokens of the listed modes (default: the small rule's)")
    p.add_argument("--gamma", type=int, default=None,
                   help="dense-row stride of the listed modes (default: the small rule's)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="prompts per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the task set")
    p.add_argument("--no-latency", action="store_true", help="skip the prefill timing of each config")
    p.add_argument("--out", default=None, help="report folder (default: the reports/ folder of the deltapass cache dir)")
    p.add_argument("--name", type=_file_stem, default="accuracy", help="file name stem of the .md, .json and .png")

    p = _subcommand(sub, "tune")
    _model_arguments(p)
    p.add_argument("--length", type=_int_at_least(1), default=None,
                   help=f"target prompt length (default: {defaults.TUNE_LENGTH})")
    p.add_argument("--lengths", type=_int_at_least(1), nargs="+", default=None, metavar="N",
                   help="several target lengths, one job each in one process (one model load, one search engine), "
                        "one cache entry per length bucket; instead of --length")
    p.add_argument("--trials", type=_int_at_least(1), default=defaults.TUNE_TRIALS,
                   help="completed trials of the sparsity study")
    p.add_argument("--samples", type=_int_at_least(1), default=defaults.TUNE_SAMPLES, help="tasks per kind per trial")
    p.add_argument("--batch-size", type=_int_at_least(1), default=defaults.TUNE_BATCH_SIZE,
                   help="prompts per prefill (1: scoring and timing share one compiled graph)")
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the calibration forward that ranks layers and seeds the study")
    p.add_argument("--no-pruning", action="store_true",
                   help="run every trial's tasks in full (by default a trial whose retrieval on the first half of "
                        "its retrieval tasks is out of the budget's reach stops there, and counts as one of --trials)")
    p.add_argument("--max-window-density", type=_finite_float(0, 1, above=True), default=defaults.MAX_WINDOW_DENSITY,
                   help="cap on (sink + window) / length")
    p.add_argument("--min-retrieval", type=_finite_float(0), default=None,
                   help=f"budget: retrieval as a fraction of dense (default: {defaults.RETRIEVAL_TARGET})")
    p.add_argument("--max-loss-delta", type=_finite_float(), default=None,
                   help=f"budget: continuation loss above dense, nats (default: {defaults.MAX_LOSS_DELTA})")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a URL (postgresql://..., sqlite:///...) or a journal file in an existing folder "
                        "(default: cache dir)")
    p.add_argument("--study", type=_file_stem, default=None,
                   help="study name, also the report's file name (default: from model, device and length)")
    p.add_argument("--timeout", type=_finite_float(0, above=True), default=None,
                   help="seconds for the sparsity study (default: no limit)")
    p.add_argument("--no-tiles", action="store_true", help="skip the tile timing phase")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler, to repeat a one-worker run (default: a fresh one per process, so "
                        "workers and resumed runs draw different parameters)")
    p.add_argument("--task-seed", type=int, default=defaults.TUNE_TASK_SEED,
                   help="seed of the task set; every worker of a study must use the same")
    p.add_argument("--out", default=None, help="report folder (default: the reports/ folder of the deltapass cache dir)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on a CPU anyway, as a smoke test of the plumbing (without it, tune refuses a CPU before "
                        "loading the model: tuning is a GPU job)")

    _subcommand(sub, "show")

    p = _subcommand(sub, "export")
    p.add_argument("entry", help="the entry's file name, as `deltapass show` lists it")
    p.add_argument("file", nargs="?", default=None, help="where to write it (default: ENTRY in the current folder)")

    p = _subcommand(sub, "import")
    p.add_argument("file", help="an entry file that `deltapass export` wrote")

    p = _subcommand(sub, "bench")
    _model_arguments(p)
    p.add_argument("--tokens", type=_int_at_least(1), default=8192, help="prompt length")
    p.add_argument("--config", default=None, help="a DeltaConfig JSON file (default: the cached tuned config)")
    return parser


def _quiet_libraries() -> None:
    """The commands print their own progress: no loader bars or deprecation notices from the libraries under them
    (--log-level DEBUG keeps them)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()        # search.models.load_model quiets the GGUF loader's bar with it
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# What runs each command of SUMMARIES.
COMMANDS: Mapping[str, Callable[[argparse.Namespace], int]] = MappingProxyType({
    "explain": explain_command, "accuracy": accuracy_command, "tune": tune_command, "show": show_command,
    "export": export_command, "import": import_command, "bench": bench_command})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One prefix per line, the logger's name; other libraries stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deltapass").setLevel(args.log_level)
    if args.command in NEEDS_SEARCH_EXTRA:
        missing = _missing_search_modules()
        if missing:
            print(f"deltapass {args.command} needs the search extra (missing: {', '.join(missing)}): "
                  f"pip install 'deltapass[search]'", file=sys.stderr)
            return 2
        if args.log_level != "DEBUG":
            _quiet_libraries()
    try:
        if hasattr(args, "device"):
            args.device = _resolve_device(args.device)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        saved = ""
        if args.command == "tune":
            from deltapass.search.storage import default_storage_path

            saved = (f"; the study's finished trials are saved in {args.storage or default_storage_path()}: run the "
                     "same command again to resume")
        print(f"\ndeltapass {args.command}: interrupted{saved}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.log_level == "DEBUG":
            traceback.print_exc()
        print(f"deltapass {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
