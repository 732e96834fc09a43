"""Calibration: how much of each layer's attention a sink + window rule drops, from one dense forward.

One prefill of shipped prose (the King James text of the tasks) runs with exact attention. In every
layer, from the post-RoPE queries and keys, we measure for each candidate (sink, window) the softmax
mass on the keys the sparse rule leaves out (neither a sink nor in the window; the set is the one
deltapass.kernels.rule defines). Layers that put much mass outside are the ones to keep dense: on
SmolLM2, the third of the layers with the most mass outside kept dense, the rest sparse with a dense
tail, closed about 94% of the loss gap to dense with full pass-key retrieval.

Averaging: over every query row of the prompt and every query head of a K/V group (per K/V head),
then over the K/V heads (per layer; groups are equal, so this is the mean over query heads). Rows
whose whole causal set lies in sink + window contribute 0, so a layer's number is the expected
fraction of a row's attention the sparse rule misses. Any row subset would rank the layers of one
candidate alike up to noise; all rows use every token of the text.

No N x N matrix is built: the statistics are computed in chunks of query rows, inside an attention
function registered with transformers' AttentionInterface, which then runs SDPA for the real output.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from deltapass.kernels import keeps_exactly_causal, sink_or_window

from .models import LoadedModel
from .tasks import prose_ids

log = logging.getLogger("deltapass.search.calibrate")

# (sink, window) candidates measured by default: the tuner's usual range plus the paper's rule.
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = ((16, 128), (64, 256), (128, 512), (128, 768), (1024, 2048))
MAX_SCORES = 1 << 26        # attention scores held at once (query rows x query heads x keys): 256 MB in fp32
_ATTENTION_NAME = "deltapass_calibration"


@dataclass(frozen=True)
class Calibration:
    """Mass outside sink + window, per candidate and layer (and K/V head), of one model at one length."""

    model: str
    length: int                                          # prompt tokens of the calibration forward
    candidates: tuple[tuple[int, int], ...]              # (sink, window)
    outside: tuple[tuple[float, ...], ...]               # [candidate][layer]
    outside_by_head: tuple[tuple[tuple[float, ...], ...], ...]   # [candidate][layer][K/V head]
    rope: dict = field(default_factory=dict)             # LoadedModel.rope of the calibrated model
    text: str = ""                                       # where the tokens came from

    def __post_init__(self) -> None:
        if len(self.outside) != len(self.candidates) or len(self.outside_by_head) != len(self.candidates):
            raise ValueError(f"outside and outside_by_head need one entry per candidate "
                             f"({len(self.candidates)}), got {len(self.outside)} and {len(self.outside_by_head)}")
        if len({len(row) for row in self.outside} | {len(row) for row in self.outside_by_head}) > 1:
            raise ValueError("outside and outside_by_head must have the same number of layers for every candidate")

    @property
    def layers(self) -> int:
        return len(self.outside[0]) if self.outside else 0

    def index(self, sink: int, window: int) -> int:
        try:
            return self.candidates.index((sink, window))
        except ValueError:
            raise ValueError(f"sink={sink}, window={window} was not calibrated; candidates: "
                             f"{list(self.candidates)}") from None

    def layer_outside(self, sink: int, window: int) -> list[float]:
        return list(self.outside[self.index(sink, window)])

    def head_outside(self, sink: int, window: int) -> list[list[float]]:
        return [list(heads) for heads in self.outside_by_head[self.index(sink, window)]]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))          # tuples -> lists, plain JSON types

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls(model=data["model"], length=int(data["length"]),
                   candidates=tuple((int(s), int(w)) for s, w in data["candidates"]),
                   outside=tuple(tuple(float(x) for x in row) for row in data["outside"]),
                   outside_by_head=tuple(tuple(tuple(float(x) for x in heads) for heads in layer)
                                         for layer in data["outside_by_head"]),
                   rope=dict(data.get("rope") or {}), text=str(data.get("text", "")))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text()))


def rank_layers(calibration: Calibration, sink: int, window: int) -> list[int]:
    """Layer indices, the most attention mass outside sink + window first (ties: lower layer first)."""
    outside = calibration.layer_outside(sink, window)
    return sorted(range(len(outside)), key=lambda layer: (-outside[layer], layer))


# ---- the statistic ------------------------------------------------------------------------------------

def _check_candidates(candidates: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out = tuple((int(s), int(w)) for s, w in candidates)
    if not out:
        raise ValueError(f"candidates must name at least one (sink, window), got candidates={candidates!r}")
    for s, w in out:
        if s < 0 or w < 0 or s + w < 1:
            raise ValueError(f"every candidate needs sink >= 0, window >= 0, sink + window >= 1, got ({s}, {w})")
    return out


def outside_mass(query: torch.Tensor, key: torch.Tensor, scale: float, candidates: Sequence[tuple[int, int]],
                 *, max_scores: int = MAX_SCORES) -> torch.Tensor:
    """Causal softmax mass outside sink + window, mean over batch, query rows and the query heads of each
    K/V head: a float64 tensor [len(candidates), Hkv].

    query [B, Hq, N, D], key [B, Hkv, N, D] (Hq a multiple of Hkv; query head h reads K/V head
    h // (Hq // Hkv), as transformers' repeat_kv expands them). Rows are taken in chunks so that at
    most about `max_scores` scores exist at once.
    """
    candidates = _check_candidates(candidates)
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    if key.shape != (b, hkv, n, d) or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)}: need [B, Hq, N, D] and "
                         f"[B, Hkv, N, D] with Hq a multiple of Hkv")
    group = hq // hkv
    q = query.reshape(b, hkv, group, n, d).float()
    k = key.float().unsqueeze(2)                                   # [B, Hkv, 1, N, D]
    rows = max(1, max_scores // max(1, b * hq * n))
    total = torch.zeros(len(candidates), hkv, dtype=torch.float64, device=query.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        t = torch.arange(r0, r1, device=query.device)[:, None]
        j = torch.arange(r1, device=query.device)[None, :]
        scores = (q[..., r0:r1, :] @ k[..., :r1, :].transpose(-1, -2)) * scale     # [B, Hkv, g, rows, r1]
        probs = scores.masked_fill(j > t, float("-inf")).softmax(dim=-1)
        for c, (s, w) in enumerate(candidates):
            dropped = (j <= t) & ~sink_or_window(t, j, s, w)
            if bool(dropped.any()):
                total[c] += (probs * dropped).sum(dim=-1).sum(dim=(0, 2, 3)).double()
    return total / (b * group * n)


class _Collector:
    """The attention function of a calibration forward: statistics from q and k, then SDPA for the output."""

    def __init__(self, candidates: tuple[tuple[int, int], ...], max_scores: int) -> None:
        self.candidates, self.max_scores = candidates, max_scores
        self.by_layer: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None and not bool(keeps_exactly_causal(
                attention_mask, "keep" if attention_mask.dtype == torch.bool else "additive")):
            raise ValueError("calibration needs plain causal self-attention (one unpadded prompt); "
                             "the model passed a different attention mask")
        layer = getattr(module, "layer_idx", None)
        layer = len(self.by_layer) if layer is None else int(layer)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.by_layer[layer] = outside_mass(query, key, scale, self.candidates,
                                            max_scores=self.max_scores).cpu()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)


def calibrate(loaded: LoadedModel, length: int, candidates: Sequence[tuple[int, int]] = DEFAULT_CANDIDATES, *,
              ids: torch.Tensor | None = None, start: int = 0, max_scores: int = MAX_SCORES) -> Calibration:
    """One dense forward of `length` tokens; the mass outside each candidate's sink + window per layer and head.

    ids: the prompt (1-D token ids, at least `length`); default: the shipped prose from token `start`.
    candidates: the (sink, window) pairs to measure; the tuner passes SparsitySpace.windows_for(length).
    """
    candidates = _check_candidates(candidates)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got length={length!r}")
    if ids is None:
        prose = prose_ids(loaded.tokenizer)
        if start < 0 or start + length > len(prose):
            raise ValueError(f"start={start}, length={length}: the shipped prose has {len(prose)} tokens")
        ids, text = prose[start:start + length], f"shipped prose, tokens {start}..{start + length - 1}"
    else:
        if ids.dim() != 1 or len(ids) < length:
            raise ValueError(f"ids must be 1-D with at least length={length} tokens, got shape {tuple(ids.shape)}")
        ids, text = ids[:length], "caller's tokens"
    model = loaded.model
    native = getattr(model.config, "max_position_embeddings", None)
    if native is not None and length > native:
        log.warning("calibrating at length=%d beyond the model's max_position_embeddings=%d "
                    "(load it with context=%d)", length, native, length)
    collector = _Collector(candidates, max_scores)
    _register(collector)
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    _set_attention(model, _ATTENTION_NAME)
    try:
        with torch.no_grad():
            model(input_ids=ids[None].to(device), use_cache=False, **kwargs)
    finally:
        _set_attention(model, previous)
    if not collector.by_layer:
        raise ValueError(f"model {loaded.name!r}: no attention call went through transformers' AttentionInterface")
    per_head = torch.stack([collector.by_layer[i] for i in sorted(collector.by_layer)], dim=1)  # [C, L, Hkv]
    per_layer = per_head.mean(dim=-1)
    log.info("calibrated %s at %d tokens: %d layers, %d candidates", loaded.name, length, per_head.shape[1],
             len(candidates))
    return Calibration(model=loaded.name, length=length, candidates=candidates,
                       outside=tuple(tuple(row) for row in per_layer.tolist()),
                       outside_by_head=tuple(tuple(tuple(h) for h in layer) for layer in per_head.tolist()),
                       rope=dict(loaded.rope), text=text)


def _register(collector: _Collector) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTENTION_NAME, collector)
    AttentionMaskInterface.register(_ATTENTION_NAME, sdpa_mask)   # no mask at all for plain causal prefill


def _set_attention(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:                                   # older transformers read the name from the config per call
        model.config._attn_implementation = name


def plot(calibration: Calibration, path: str | Path) -> None:
    """Mass outside sink + window by layer, one line per candidate (dots: its K/V heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    layers = range(calibration.layers)
    for c, (sink, window) in enumerate(calibration.candidates):
        line, = ax.plot(layers, calibration.outside[c], marker="o", ms=3, label=f"sink {sink} + window {window}")
        for layer, heads in enumerate(calibration.outside_by_head[c]):
            ax.scatter([layer] * len(heads), heads, s=6, color=line.get_color(), alpha=0.35)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass outside sink + window")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{calibration.model}: {calibration.length} tokens ({calibration.text})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
