"""The accuracy table: dense, sparse only and every correction mode, swept, on one task set.

`deltapass accuracy` runs this; the committed tables under docs/ come from it on the H200.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import torch

from deltapass.config import DeltaConfig, SiteConfig

from . import report
from .harness import evaluate, prefill_latency_ms, uniform
from .models import LoadedModel
from .tasks import build_tasks

log = logging.getLogger("deltapass.search.accuracy")


@dataclass(frozen=True)
class Sweep:
    sink: int = 64
    window: int = 256
    gammas: tuple[int, ...] = (16, 64)
    windows: tuple[tuple[int, int], ...] = ((16, 112), (128, 512))   # (sink, window) for the density sweep


def layer_split(correction_first: str, correction_rest: str, layers: int, split: int, base: SiteConfig) -> DeltaConfig:
    """correction_first on layers [0, split), correction_rest on the others."""
    return DeltaConfig(default=SiteConfig(base.sink, base.window, base.gamma, correction_rest),
                       layers={i: SiteConfig(base.sink, base.window, base.gamma, correction_first)
                               for i in range(split)})


def standard_configs(layers: int, sweep: Sweep = Sweep()) -> list[tuple[str, DeltaConfig | None]]:
    """Dense, every mode at the base sparsity, gamma and density sweeps, and per-layer assignments."""
    s, w = sweep.sink, sweep.window
    configs: list[tuple[str, DeltaConfig | None]] = [("dense", None)]
    for mode in ("none", "delta", "recompute"):
        configs.append((f"{mode} s{s}+w{w} g64", uniform(mode, s, w, 64)))
    for gamma in sweep.gammas:
        if gamma != 64:
            for mode in ("delta", "recompute"):
                configs.append((f"{mode} s{s}+w{w} g{gamma}", uniform(mode, s, w, gamma)))
    for sink, window in sweep.windows:
        for mode in ("none", "delta"):
            configs.append((f"{mode} s{sink}+w{window} g64", uniform(mode, sink, window, 64)))
    base = SiteConfig(sink=s, window=w, gamma=64)
    half = layers // 2
    configs += [
        (f"recompute L0-{half - 1}, delta rest", layer_split("recompute", "delta", layers, half, base)),
        (f"delta L0-{half - 1}, recompute rest", layer_split("delta", "recompute", layers, half, base)),
        (f"dense L0-1, recompute rest", layer_split("dense", "recompute", layers, 2, base)),
    ]
    return configs


def run(loaded: LoadedModel, *, lengths: tuple[int, ...], samples: int, configs: list[tuple[str, DeltaConfig | None]],
        out_dir: str, name: str, batch_size: int = 8, seed: int = 0, engine: str = "interface",
        latency: bool = True, progress=None) -> list[report.Summary]:
    """Evaluate every config on one task set; write {name}.md/.json/.png under out_dir."""
    tasks = build_tasks(loaded.tokenizer, lengths=lengths, samples=samples, seed=seed)
    evaluations, latencies = [], {}
    start = time.perf_counter()
    for label, config in configs:
        evaluations.append(evaluate(loaded, config, tasks, engine=engine, batch_size=batch_size, label=label))
        if latency:
            latencies[label] = prefill_latency_ms(loaded, config, max(lengths))
        if progress is not None:
            progress(label, evaluations[-1], latencies.get(label))
    device = next(loaded.model.parameters()).device
    meta = {"model": loaded.name, "source": loaded.source, "lengths": list(lengths), "samples_per_cell": samples,
            "seed": seed, "engine": engine, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "dtype": str(next(loaded.model.parameters()).dtype),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
    title = (f"{loaded.name}: accuracy by attention config ({meta['device']}, {meta['dtype']}, "
             f"{samples} samples per cell, seed {seed})")
    return report.write(evaluations, out_dir, name, title, latencies if latency else None, meta)
