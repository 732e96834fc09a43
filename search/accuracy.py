"""The accuracy table: dense, sparse only and every correction mode, swept, on one task set.

`deltapass accuracy` runs this; the committed tables under docs/ come from it on the H200.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import torch

from deltapass import presets
from deltapass.config import DeltaConfig, SiteConfig

from . import report
from .harness import CompiledModel, evaluate
from .models import LoadedModel
from .tasks import build_tasks

log = logging.getLogger("deltapass.search.accuracy")


@dataclass(frozen=True)
class Sweep:
    sink: int = presets.SMALL.sink
    window: int = presets.SMALL.window
    gammas: tuple[int, ...] = (16, 64)
    windows: tuple[tuple[int, int], ...] = ((16, 112), (128, 512))   # (sink, window) for the density sweep


def layer_split(correction_first: str, correction_rest: str, layers: int, split: int, base: SiteConfig) -> DeltaConfig:
    """correction_first on layers [0, split), correction_rest on the others."""
    return DeltaConfig(default=SiteConfig(base.sink, base.window, base.gamma, correction_rest),
                       layers={i: SiteConfig(base.sink, base.window, base.gamma, correction_first)
                               for i in range(split)})


def standard_configs(layers: int, sweep: Sweep = Sweep()) -> list[tuple[str, DeltaConfig | None]]:
    """Dense, every mode at the base sparsity, gamma and density sweeps, and per-layer assignments."""
    base = SiteConfig(sink=sweep.sink, window=sweep.window, gamma=presets.SMALL.gamma)
    uniform = [presets.uniform(base, mode) for mode in ("none", "delta", "recompute")]
    uniform += [presets.uniform(SiteConfig(sweep.sink, sweep.window, gamma), mode)
                for gamma in sweep.gammas if gamma != base.gamma for mode in ("delta", "recompute")]
    uniform += [presets.uniform(SiteConfig(sink, window, base.gamma), mode)
                for sink, window in sweep.windows for mode in ("none", "delta")]
    configs: list[tuple[str, DeltaConfig | None]] = [("dense", None)]
    configs += [(presets.label(c), c) for c in uniform]
    half = layers // 2
    configs += [
        (f"recompute L0-{half - 1}, delta rest", layer_split("recompute", "delta", layers, half, base)),
        (f"delta L0-{half - 1}, recompute rest", layer_split("delta", "recompute", layers, half, base)),
        (f"dense L0-1, recompute rest", layer_split("dense", "recompute", layers, 2, base)),
    ]
    return configs


def run(loaded: LoadedModel, *, lengths: tuple[int, ...], samples: int, configs: list[tuple[str, DeltaConfig | None]],
        out_dir: str, name: str, batch_size: int = 8, seed: int = 0, latency: bool = True,
        progress=None) -> list[report.Summary]:
    """Evaluate every config on one task set; write {name}.md/.json/.png under out_dir."""
    tasks = build_tasks(loaded.tokenizer, lengths=lengths, samples=samples, seed=seed)
    model = CompiledModel(loaded)
    evaluations, latencies = [], {}
    start = time.perf_counter()
    for label, config in configs:
        evaluations.append(evaluate(model, config, tasks, batch_size=batch_size, label=label))
        if latency:
            latencies[label] = model.latency(config, max(lengths)).median_ms
        if progress is not None:
            progress(label, evaluations[-1], latencies.get(label))
    device = next(loaded.model.parameters()).device
    meta = {"model": loaded.name, "source": loaded.source, "lengths": list(lengths), "samples_per_cell": samples,
            "seed": seed, "torch_compile_mode": model.mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "dtype": str(next(loaded.model.parameters()).dtype),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
    title = (f"{loaded.name}: accuracy by attention config ({meta['device']}, {meta['dtype']}, "
             f"{samples} samples per cell, seed {seed})")
    return report.write(evaluations, out_dir, name, title, latencies if latency else None, meta)
