"""The `deltapass` command line. Library code logs; this module prints.

Heavy imports (transformers, optuna) happen inside the commands, so `deltapass --help` is instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
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


def _load_config(path: str | None):
    from .config import DeltaConfig

    return DeltaConfig.from_json(path) if path else None


@command("explain")
def explain_command(args: argparse.Namespace) -> int:
    """Trace the model at a prompt length and print every attention site's verdict."""
    from deltapass.search.models import load_model

    from .explain import explain

    loaded = load_model(args.model, device=args.device)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    report = explain(loaded.model, ids, config=_load_config(args.config))
    print(f"{loaded.name} ({loaded.source}), {args.tokens} tokens")
    print(report)
    if args.verbose:
        for site in report.sites:
            for note in site.notes:
                print(f"  {site.name}: {note}")
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
