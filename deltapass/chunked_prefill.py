"""deltapass.prefill: a prompt through a (compiled) transformers model chunk by chunk over a KV cache.

(The module is not named prefill.py: importing a submodule binds its name on the package, which would
hide the function deltapass.prefill after its first use.)
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from deltapass.kernels.prompt import prompt_length


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, *, chunk: int,
            attention_mask: torch.Tensor | None = None, cache: Any = None) -> tuple[Any, Any]:
    """Run `model` over `input_ids` [B, N] in chunks of `chunk` tokens, each after the cache's tokens, under
    torch.no_grad() and inside deltapass.kernels.prompt_length(P + N), P the tokens the cache already holds.

    Returns (the last chunk's model output, the cache). The output's logits are the last position's only when
    the model's forward takes logits_to_keep (a causal LM: each chunk then skips the LM head for its other
    rows); continue with exact decoding from them, or prefill all but the prompt's last token and call
    generate(input_ids, <cache keyword>=cache) to decode the rest.

    cache: a transformers Cache to fill (None: a new DynamicCache); it is passed as the forward's `cache`
    keyword, or `past_key_values` where forward has no `cache` (transformers before 5). attention_mask: [B, P + N]
    as transformers takes it; each chunk gets its first P + end columns.

    What it computes: compiled with backend="delta", every chunk's attention sites run Δ with queries at their
    prompt positions. Chunks whose starts (P + k * chunk) are multiples of the config's gamma give exactly the
    rows of one compiled call over the whole prompt; a chunk starting elsewhere anchors its first gamma block
    at its own first row (kernels/rule.py), a documented deviation. Not under CUDA graphs: a recording would
    replay one chunk's prompt length (the op raises).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens] with at least one token, got "
                         f"{type(input_ids).__name__} of shape {tuple(getattr(input_ids, 'shape', ()))} and "
                         f"dtype {getattr(input_ids, 'dtype', None)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk must be an int (tokens per forward), got chunk={chunk!r} ({type(chunk).__name__})")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (tokens per forward), got chunk={chunk}")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    elif not callable(getattr(cache, "get_seq_length", None)):
        raise ValueError(f"cache must be a transformers Cache (e.g. DynamicCache) or None, got {type(cache).__name__}")
    held, (batch, n) = int(cache.get_seq_length()), input_ids.shape
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != (batch, held + n)):
        raise ValueError(f"attention_mask must be a tensor [batch, cached + new tokens] = [{batch}, {held + n}], "
                         f"got shape {tuple(getattr(attention_mask, 'shape', ()))}")
    parameters = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    keyword = "cache" if "cache" in parameters else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    output = None
    with torch.no_grad(), prompt_length(held + n):
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            if attention_mask is not None:
                extra["attention_mask"] = attention_mask[:, :held + end]
            output = model(input_ids[:, start:end], use_cache=True, **{keyword: cache}, **extra)
            # The output names the cache as forward does (ModelOutput is a dict; reading the other name warns).
            returned = output.get(keyword) if isinstance(output, dict) else None
            cache = cache if returned is None else returned
    return output, cache
