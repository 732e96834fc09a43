"""What a tuning job costs at the users' scale: a Llama-3.1-8B-shaped model, bf16, one GPU, 128K tokens.

    python benchmarks/tune_at_scale.py --out tune_at_scale.json                   # 8B shape, 128K, 64 trials
    python benchmarks/tune_at_scale.py --timeout 420 --out part1.json             # a time-limited call; the same
                                                                                  # --work folder resumes the study
    python benchmarks/tune_at_scale.py --shape tiny-llama --device cpu --length 2048 --trials 2 --samples 1 \\
        --out tune_cpu.json                                                       # plumbing check

The job is deltapass.search.tune.tune, as `deltapass tune --no-tiles` runs it: dense baseline, calibration,
the trials, the confirmation on the graph users compile. Random weights (there are no 8B weights on the GPU
machine; the CPU plumbing shapes get the tokenizer's vocabulary): **the accuracy side means nothing here**
(dense answers no retrieval task, so every trial scores retrieval 1 and none is stopped early; the pick is
whatever is fastest). The run measures cost and memory
only: seconds per stage and the peak GPU memory of each stage, with the tokenizer of the embedded SmolLM2 for
the task prompts (its ids are valid Llama-3.1 ids). The study's journal and the cache entry go to --work
(default: a folder next to --out), never to the user's cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from record import header
from shapes import MODELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(MODELS), help="model shape (shapes.py)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--length", type=int, default=131072, help="prompt tokens")
    p.add_argument("--trials", type=int, default=64, help="finished trials of the study")
    p.add_argument("--samples", type=int, default=8, help="tasks per kind per trial")
    p.add_argument("--timeout", type=float, default=None, help="seconds for the trials of this call (then resume)")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--work", default=None, help="journal, cache and reports (default: OUT's stem + '-work')")
    p.add_argument("--out", required=True, help="result JSON")
    return p.parse_args(argv)


def build_loaded(shape: str, device: str, length: int):
    """A LoadedModel of random weights in the shape, bf16 on a GPU (float32 on the CPU), with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from bench_e2e import build
    from deltapass.search.models import LoadedModel, default_model_path

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build(shape, device, dtype, max_len=length)
    gguf = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = 1 << 30              # the task prose is tokenized whole, then cut to the length
    if model.config.vocab_size < len(tokenizer):      # the CPU plumbing shapes' vocabularies are smaller
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"{shape}-random", source=f"shapes.py:{shape}")


class StageMemory(logging.Handler):
    """Peak GPU memory (allocated, GiB) of each stage: tune()'s progress lines (logger deltapass.search.tune, INFO,
    with progress=False) mark where a stage starts; each line is printed too."""

    STARTS = {"dense baseline:": "dense baseline", "calibration:": "calibration", "trials:": "trials",
              "confirming": "confirmation", "no trial within": "confirmation"}

    def __init__(self, device: str) -> None:
        super().__init__(logging.INFO)
        self.cuda = device.startswith("cuda")
        self.peaks: dict[str, float] = {}
        self.current = "model build"
        self._reset()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def mark(self, stage: str) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), peak)
        self.current = stage
        self._reset()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
        stage = next((stage for head, stage in self.STARTS.items() if message.startswith(head)), None)
        if stage is not None:
            self.mark(stage)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import optuna

    from deltapass.cache import TunedConfigCache
    from deltapass.search import tune as tuning
    from deltapass.search.storage import load_or_create_study, open_storage

    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deltapass").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    memory = StageMemory(args.device)
    tune_log = logging.getLogger("deltapass.search.tune")
    tune_log.setLevel(logging.INFO)
    tune_log.addHandler(memory)
    tune_log.propagate = False                        # the handler prints its lines
    start = time.perf_counter()
    loaded = build_loaded(args.shape, args.device, args.length)
    build_s = time.perf_counter() - start
    memory.mark("dense baseline")
    settings = tuning.TuneSettings(length=args.length, trials=args.trials, samples=args.samples, seed=0,
                                   study=f"{args.shape}-n{args.length}", storage=str(work / "journal.log"),
                                   timeout=args.timeout, tile_trials=False, calibrate=not args.no_calibration)
    study = load_or_create_study(settings.study, open_storage(settings.storage), tuning.DIRECTIONS)
    before = len(tuning.finished_trials(study))
    result = tuning.tune(loaded, settings, cache=TunedConfigCache(work / "cache"), progress=False)
    memory.mark("done")
    finished = len(tuning.finished_trials(study))
    ran = finished - before
    record = {
        "meta": header(args.device, shape=args.shape, length=args.length, trials=args.trials, samples=args.samples,
                       dtype=str(next(loaded.model.parameters()).dtype),
                       caveat="random weights: accuracy values mean nothing; this run measures cost and memory"),
        "model_build_s": round(build_s, 1),
        "stages_s": {k: round(v, 1) for k, v in result.stages.items()},
        "total_s": round(time.perf_counter() - start, 1),
        "peak_memory_gib": {k: round(v, 2) for k, v in memory.peaks.items()},
        "trials": {"finished": finished, "asked": args.trials,
                   "seconds_each_this_call": round(result.stages.get("trials", 0.0) / max(1, ran), 1)},
        "result": result.to_dict(),
    }
    out.write_text(json.dumps(record, indent=1, default=float))
    print(json.dumps({k: record[k] for k in ("model_build_s", "stages_s", "total_s", "peak_memory_gib", "trials")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
