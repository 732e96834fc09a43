"""The `deltapass` command line. Library code logs; this module prints.

Heavy imports (transformers, optuna) happen inside the commands, so `deltapass --help` is instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return register


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a .gguf file or a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=None,
                        help="context length to run at; past the model's native length its RoPE gets YaRN "
                             "scaling (a model folder's own rope scaling is kept). Default: the native length")


def _load_config(path: str | None):
    from .config import DeltaConfig

    return DeltaConfig.from_json(path) if path else None


@command("explain")
def explain_command(args: argparse.Namespace) -> int:
    """Trace the model at a prompt length and print every attention site's verdict."""
    from deltapass.search.models import load_model

    from .explain import explain

    loaded = load_model(args.model, device=args.device, context=args.context)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.no_grad():                      # the grad mode of inference, which the report depends on
        report = explain(loaded.model, ids, config=_load_config(args.config))
    print(f"{loaded.name} ({loaded.source}), {args.tokens} tokens")
    print(report)
    if args.verbose:
        for site in report.sites:
            for note in site.notes:
                print(f"  {site.name}: {note}")
    return 0


@command("accuracy")
def accuracy_command(args: argparse.Namespace) -> int:
    """The accuracy table: dense, sparse only and every correction mode on the RULER-style tasks."""
    from deltapass.search import accuracy
    from deltapass.search.models import load_model

    from . import presets
    from .config import SiteConfig

    loaded = load_model(args.model, device=args.device, context=args.context)
    layers = loaded.model.config.num_hidden_layers
    sweep = accuracy.Sweep(sink=args.sink, window=args.window)
    if args.configs == "standard":
        configs = accuracy.standard_configs(layers, sweep)
    else:
        configs = []
        for item in args.configs.split(","):
            if item == "dense":
                configs.append(("dense", None))
            elif item in ("none", "delta", "recompute", "tail"):
                config = presets.uniform(SiteConfig(args.sink, args.window, args.gamma), item)
                configs.append((presets.label(config), config))
            else:                                   # a DeltaConfig JSON file
                from .config import DeltaConfig

                configs.append((item.rsplit("/", 1)[-1].removesuffix(".json"), DeltaConfig.from_json(item)))
        if not any(c is None for _, c in configs):
            configs.insert(0, ("dense", None))

    def progress(label, evaluation, latency):
        cells = "  ".join(f"{s.kind}@{s.length}={s.value:.3f}" for s in evaluation.scores)
        print(f"{label:<40} {cells}  ({evaluation.seconds:.0f} s" + (f", prefill {latency:.1f} ms)" if latency else ")"),
              flush=True)

    summaries = accuracy.run(loaded, lengths=tuple(args.lengths), samples=args.samples, configs=configs,
                             out_dir=args.out, name=args.name, batch_size=args.batch_size, seed=args.seed,
                             latency=not args.no_latency, progress=progress)
    print((Path(args.out) / f"{args.name}.md").read_text())
    print(f"wrote {args.out}/{args.name}.md, .json, .png ({len(summaries)} configs)")
    return 0


@command("tune")
def tune_command(args: argparse.Namespace) -> int:
    """One tuning job on one device: tiles, then sparsity and per-layer corrections; the pick is cached."""
    import json

    from deltapass.search import tune
    from deltapass.search.models import load_model
    from deltapass.search.space import SparsitySpace

    import optuna

    from deltapass.search.report import pareto_plot, pareto_table
    from deltapass.search.storage import check_storage, load_or_create_study, open_storage

    from .cache import TunedConfigCache

    # What can fail in a second fails before the model loads and the study runs.
    TunedConfigCache().check_writable()
    check_storage(args.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)     # the progress bar reports each trial
    loaded = load_model(args.model, device=args.device, context=args.context)
    settings = tune.TuneSettings(length=args.length, trials=args.trials, samples=args.samples,
                                 batch_size=args.batch_size, seed=args.seed, study=args.study, storage=args.storage,
                                 timeout=args.timeout, tile_trials=not args.no_tiles,
                                 calibrate=not args.no_calibration,
                                 space=SparsitySpace(max_window_density=args.max_window_density),
                                 budget=tune.Budget(args.min_retrieval, args.max_loss_delta))
    result = tune.tune(loaded, settings)
    out = Path(args.out or Path(result.cache_path).parent.parent / "reports")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / result.study_name
    Path(f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=1, default=float))
    study = load_or_create_study(result.study_name, open_storage(args.storage), tune.DIRECTIONS)
    dense_ms = result.baseline["dense_latency"]["median_ms"]
    pareto_plot(study, f"{stem}.png", f"{loaded.name} at {args.length} tokens: {result.study_name}", dense_ms)
    print(pareto_table(result.pareto))
    r, dl, ms = result.values
    timing = "CUDA graphs" if result.baseline["dense_latency"]["cuda_graphs"] else \
        "no CUDA graphs; on a CPU the op runs its exact float32 reference, so CPU latencies say nothing of GPU speed"
    if result.trial is None:
        print(f"\npicked: all-dense ({result.verdict}); dense prefill {dense_ms:.2f} ms ({timing})")
    else:
        print(f"\npicked: trial {result.trial}, retrieval {r:.2f} of dense, loss {dl:+.4f} nats, prefill "
              f"{ms:.2f} ms vs all-dense {dense_ms:.2f} ms ({dense_ms / ms:.2f}x, {timing}): {result.verdict}")
    if result.calibration is not None:
        from deltapass.search.calibrate import Calibration, plot

        calibration = Calibration.from_dict(result.calibration)
        calibration.save(f"{stem}-calibration.json")
        plot(calibration, f"{stem}-calibration.png")
    print(f"cached: {result.cache_path}\nreport: {stem}.json, {stem}.png ({result.seconds:.0f} s)")
    return 0


@command("show")
def show_command(args: argparse.Namespace) -> int:
    """Every cached tuned config, and whether it can be used here."""
    from .cache import TunedConfigCache

    cache = TunedConfigCache()
    entries = cache.entries()
    print(f"cache: {cache.config_dir} ({len(entries)} entries)")
    for path, entry, status in entries:
        if entry is None:
            print(f"  {path.name}: {status}")
            continue
        d = entry.config.default
        meta = entry.meta
        print(f"  {path.name}: {status}\n    {entry.hardware.device_name} ({entry.hardware.capability}), "
              f"torch {entry.hardware.torch_version}, triton {entry.hardware.triton_version}; "
              f"model {meta.get('model', '?')}, bucket {entry.bucket}, study {meta.get('study', '?')}\n"
              f"    default {d.correction} sink={d.sink} window={d.window} gamma={d.gamma}, "
              f"{len(entry.config.layers)} layer overrides; values {meta.get('values', {})}")
    return 0


@command("bench")
def bench_command(args: argparse.Namespace) -> int:
    """Prefill latency of a model as compiled: all-dense vs the tuned entry (or --config) vs the paper's rule."""
    from deltapass.search.harness import CompiledModel
    from deltapass.search.models import load_model
    from deltapass.search.tune import model_fingerprint

    from . import presets
    from .cache import HardwareKey, TunedConfigCache

    loaded = load_model(args.model, device=args.device, context=args.context)
    paper = presets.uniform(presets.PAPER)
    configs = {"all-dense (SDPA is_causal)": presets.ALL_DENSE, f"paper rule ({presets.label(paper)})": paper}
    tuned = _load_config(args.config)
    if tuned is not None:
        configs[f"--config {args.config}"] = tuned
    else:
        found = TunedConfigCache().resolve(HardwareKey.current(args.device), model_fingerprint(loaded), args.tokens)
        if found.entry is not None:
            configs[f"tuned ({found.path.name})"] = found.entry.config
        else:
            print(f"no tuned entry: {found.reason}")
    model = CompiledModel(loaded)
    print(f"{loaded.name} on {args.device}, {args.tokens} tokens, torch.compile mode {model.mode!r}; "
          "median of warm runs [10th-90th percentile]")
    dense_ms = None
    for label, config in configs.items():
        t = model.latency(config, args.tokens)
        dense_ms = dense_ms or t.median_ms
        note = ""
        if config.default.correction != "dense" and args.tokens <= config.default.sink + config.default.window:
            note = "  (sink + window cover the prompt: exact attention)"
        print(f"{label:<50} {t.median_ms:9.2f} ms [{t.p10_ms:.2f}-{t.p90_ms:.2f}]   "
              f"{dense_ms / t.median_ms:5.2f}x all-dense{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltapass", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="library log level (INFO shows what the pass does)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="which attention sites the pass replaces in a model, and why not")
    _model_arguments(p)
    p.add_argument("--tokens", type=int, default=2048, help="prompt length to trace (default 2048)")
    p.add_argument("--config", default=None, help="a DeltaConfig JSON file (default: the paper's config)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each site's notes")

    p = sub.add_parser("accuracy", help="accuracy table of attention configs (markdown, JSON, PNG)")
    _model_arguments(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--samples", type=int, default=20, help="tasks per kind and length (default 20)")
    p.add_argument("--configs", default="standard",
                   help="'standard' (the full sweep) or a comma list of dense, none, delta, recompute, CONFIG.json")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--gamma", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-latency", action="store_true", help="skip the prefill timing of each config")
    p.add_argument("--out", default="accuracy-report")
    p.add_argument("--name", default="accuracy")

    p = sub.add_parser("tune", help="tune tiles, sparsity and per-layer corrections on this device; cache the pick")
    _model_arguments(p)
    p.add_argument("--length", type=int, default=8192, help="target prompt length (default 8192)")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="tasks per kind per trial (default 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the calibration forward that ranks layers and seeds the study")
    p.add_argument("--max-window-density", type=float, default=0.10, help="cap on (sink + window) / length")
    p.add_argument("--min-retrieval", type=float, default=0.95, help="budget: retrieval as a fraction of dense")
    p.add_argument("--max-loss-delta", type=float, default=0.02, help="budget: continuation loss above dense, nats")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a URL (postgresql://..., sqlite:///...) or a journal file (default: cache dir)")
    p.add_argument("--study", default=None, help="study name (default: from model, device and length)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the sparsity study")
    p.add_argument("--no-tiles", action="store_true", help="skip the tile timing phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report folder (default: the cache dir's reports/)")

    sub.add_parser("show", help="list the cached tuned configs")

    p = sub.add_parser("bench", help="prefill latency: dense vs tuned vs the paper's rule")
    _model_arguments(p)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--config", default=None, help="a DeltaConfig JSON file (default: the cached tuned config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    if getattr(args, "tokens", 1) < 1:
        print(f"deltapass: --tokens must be >= 1, got {args.tokens}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
