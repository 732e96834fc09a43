"""Chunked prefill through the pass: a transformers model prefilled chunk by chunk over a KV cache gets Δ in
every chunk (the chunks' bottom-right causal masks proven at compile time, or checked per call under dynamic
shapes); decode and is_causal=True with fewer queries than keys stay exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from test_hf_models import SMALL, build  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import deltapass  # noqa: E402
from deltapass import DeltaConfig  # noqa: E402
from deltapass.kernels import delta_attention  # noqa: E402

N, CHUNK = 600, 192            # chunks start at multiples of SMALL's gamma (16); the last one has 24 tokens


def _chunk_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per-layer truth: the Δ op applied directly to each chunk (queries bottom-right over the cache's keys)."""
    if query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = delta_attention(query, key, value, scale=scaling, **SMALL.op_arguments())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("deltapass_chunk_reference", _chunk_reference)


def run_in_chunks(model, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, DynamicCache]:
    """The model over ids chunk by chunk, each chunk after the cache's tokens: (every position's logits, cache)."""
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            logits.append(model(ids[:, start:start + chunk], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


def twin(model, attn: str, **extra):
    copy = build("llama", attn, **extra)
    copy.load_state_dict(model.state_dict())
    return copy


class ShortQueries(nn.Module):
    """SDPA with is_causal=True and fewer queries than keys: PyTorch aligns the causal mask top-left."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_is_causal_with_fewer_queries_than_keys_stays_untouched():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (96, 300, 300))
    torch._dynamo.reset()
    with torch.no_grad():
        report = deltapass.explain(ShortQueries(), q, k, v, config=DeltaConfig(default=SMALL))
    [site] = report.sites
    assert site.action == "untouched" and "which SDPA aligns top-left" in site.reason, str(report)


@pytest.mark.parametrize("dynamic", [False, True])
def test_every_chunk_takes_delta_and_matches_the_per_layer_truth(dynamic):
    """Static shapes prove each chunk's mask bottom-right causal at compile time; under dynamic=True the mask is
    built from symbolic sizes and checked per call, and all chunks share a few graphs, not one per chunk."""
    torch.manual_seed(10)
    model = build("llama", "sdpa")
    ids = torch.randint(0, 96, (1, N))
    backend = deltapass.backend(DeltaConfig(default=SMALL), inner="aot_eager", cache=False)
    torch._dynamo.reset()
    out, cache = run_in_chunks(torch.compile(model, backend=backend, dynamic=dynamic), ids, CHUNK)
    truth, truth_cache = run_in_chunks(twin(model, "deltapass_chunk_reference"), ids, CHUNK)
    exact, _ = run_in_chunks(model, ids, CHUNK)
    torch.testing.assert_close(out, truth, atol=1e-3, rtol=1e-3)
    for layer, want in zip(cache.layers, truth_cache.layers):
        torch.testing.assert_close(layer.keys, want.keys, atol=1e-4, rtol=1e-4)
    assert (out[:, CHUNK:] - exact[:, CHUNK:]).abs().max() > 0.05          # the chunks after the first took Δ
    chunk_plans = [p for p in backend.plans if any(s.chunk for s in p.sites)]
    assert chunk_plans and all(d.uses_delta for p in backend.plans for d in p.decisions)
    checked = {d.mask_checked_per_call for p in chunk_plans for d in p.decisions}
    assert checked == {dynamic}, [p.decisions for p in chunk_plans]
    assert all("on a chunk over the KV cache" in d.reason for p in chunk_plans for d in p.decisions)
    assert len(backend.plans) == (3 if dynamic else -(-N // CHUNK)), len(backend.plans)
    torch._dynamo.reset()


def test_a_sliding_window_chunk_mask_gets_exact_attention_under_the_mask():
    """A chunk whose mask is not bottom-right causal (a sliding window) is attended exactly under its mask: left
    untouched with static shapes, and under dynamic shapes the per-call check sends it to exact attention."""
    torch.manual_seed(11)
    model = build("mistral", "sdpa", head_dim=64, sliding_window=40)
    ids = torch.randint(0, 96, (1, 400))
    exact, _ = run_in_chunks(model, ids, 160)
    for dynamic in (False, True):
        backend = deltapass.backend(DeltaConfig(default=SMALL), inner="aot_eager", cache=False)
        torch._dynamo.reset()
        out, _ = run_in_chunks(torch.compile(model, backend=backend, dynamic=dynamic), ids, 160)
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)
        decisions = [(d.action, d.reason) for p in backend.plans[1:] for d in p.decisions]
        if dynamic:
            assert {a for a, _ in decisions} == {"delta_checked"}, decisions
        else:
            assert all(a == "untouched" and "mask is not causal" in r for a, r in decisions), decisions
    torch._dynamo.reset()


def test_a_dense_chunk_keeps_its_own_attention_not_top_left_is_causal():
    """The all-dense config on a chunk: SDPA is_causal would align the chunk top-left, so a proven chunk is left as
    the model wrote it and a checked one (dynamic shapes) takes exact attention under its mask."""
    from deltapass import presets

    torch.manual_seed(12)
    model = build("llama", "sdpa")
    ids = torch.randint(0, 96, (1, 300))
    exact, _ = run_in_chunks(model, ids, 160)
    for dynamic, action in ((False, "untouched"), (True, "exact_checked")):
        backend = deltapass.backend(presets.ALL_DENSE, inner="aot_eager", cache=False)
        torch._dynamo.reset()
        out, _ = run_in_chunks(torch.compile(model, backend=backend, dynamic=dynamic), ids, 160)
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)
        assert [d.action for d in backend.plans[0].decisions] == ["exact_causal"] * 2
        assert all(d.action == action and "configured dense" in d.reason and "SDPA" not in d.reason
                   for d in backend.plans[1].decisions), backend.plans[1].decisions
    torch._dynamo.reset()

