"""The model shapes the benchmarks run, by name: one table, which every script reads.

Latency does not depend on the weights, so the benchmarks build these shapes with random weights as transformers
Llama models (`ModelShape.llama_config`); the kernel benchmarks take one shape's attention alone
(`ModelShape.attention`). A new shape is one entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: batch, query heads, K/V heads, head dim."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes as the benchmarks build it; `extra` holds further LlamaConfig fields."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    mlp: int
    vocab: int
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict)

    @property
    def attention(self) -> AttentionShape:
        return AttentionShape(1, self.q_heads, self.kv_heads, self.head_dim)

    def llama_config(self) -> dict:
        """Keyword arguments of transformers' LlamaConfig for this shape."""
        return dict(hidden_size=self.hidden, intermediate_size=self.mlp, num_hidden_layers=self.layers,
                    num_attention_heads=self.q_heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                    vocab_size=self.vocab, rope_theta=self.rope_theta, **self.extra)


MODELS: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape(layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden=4096, mlp=14336,
                               vocab=128256, rope_theta=500000.0),
    # Qwen2.5-7B-Instruct-1M's sizes, built as a Llama (without the bias of its q/k/v projections).
    "qwen2.5-7b-1m": ModelShape(layers=28, q_heads=28, kv_heads=4, head_dim=128, hidden=3584, mlp=18944,
                                vocab=152064, rope_theta=10000000.0),
    "smollm2-135m": ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, hidden=576, mlp=1536, vocab=49152,
                               rope_theta=100000.0, extra={"tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    # Plumbing checks on the CPU (--device cpu): two layers, each script's smallest run.
    "tiny-llama": ModelShape(layers=2, q_heads=4, kv_heads=2, head_dim=64, hidden=256, mlp=512, vocab=512),
    "tiny-smollm2": ModelShape(layers=2, q_heads=2, kv_heads=1, head_dim=64, hidden=128, mlp=256, vocab=256),
}


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model shape {name!r} is not in benchmarks/shapes.py; known: {', '.join(MODELS)}") from None
