"""Chunked prefill through the pass: a transformers model prefilled chunk by chunk over a KV cache gets Δ in
every chunk (the chunks' bottom-right causal masks proven at compile time, or checked per call under dynamic
shapes); decode and is_causal=True with fewer queries than keys stay exact. deltapass.prefill runs the chunks
inside deltapass.kernels.prompt_length(), so chunks at multiples of gamma equal one call over the prompt."""
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
from deltapass.kernels import delta_attention, prompt_length  # noqa: E402
from deltapass.kernels.prompt import current_prompt_length  # noqa: E402

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


def _reference_of_a_prompt(length: int):
    """Per-layer truth for chunks of a `length`-token prompt: the Δ op given that prompt_length explicitly."""
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = delta_attention(query, key, value, scale=scaling, prompt_length=length, **SMALL.op_arguments())
        return out.transpose(1, 2).contiguous(), None
    return attend


AttentionInterface.register("deltapass_prompt_600", _reference_of_a_prompt(N))


def assert_caches_close(got, want, atol=1e-4):
    for layer, (a, b) in enumerate(zip(got.layers, want.layers, strict=True)):
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=atol,
                                       msg=lambda m: f"layer {layer} {name}: {m}")


def cache_gap(got, want) -> float:
    return max((a.keys - b.keys).abs().max().item() for a, b in zip(got.layers, want.layers))


def compiled_llama(seed: int):
    """A tiny Llama, an N-token prompt, and the model compiled under dynamic=True with SMALL on every site."""
    torch.manual_seed(seed)
    model = build("llama", "sdpa")
    ids = torch.randint(0, 96, (1, N))
    backend = deltapass.backend(DeltaConfig(default=SMALL), inner="aot_eager", cache=False)
    torch._dynamo.reset()
    return model, ids, backend, torch.compile(model, backend=backend, dynamic=True)


def test_prefill_in_chunks_at_multiples_of_gamma_equals_one_call():
    """deltapass.prefill over chunks of 192 (a multiple of gamma 16) gives one compiled call's last logits and
    cache; the same chunks without it (each chunk's last rows the prompt's dense tail) do not. Under dynamic=True
    the one call and the four chunks share three graphs."""
    model, ids, backend, compiled = compiled_llama(seed=13)
    with torch.no_grad():
        one_call = compiled(ids, cache=(one_cache := DynamicCache()), use_cache=True).logits[:, -1]
        exact = model(ids).logits[:, -1]
    output, cache = deltapass.prefill(compiled, ids, chunk=CHUNK)
    assert output.logits.shape == (1, 1, 96)                               # logits_to_keep=1: the last position's
    torch.testing.assert_close(output.logits[:, -1], one_call, atol=1e-4, rtol=1e-4)
    assert_caches_close(cache, one_cache)
    assert (one_call - exact).abs().max() > 0.05                          # Δ really ran
    assert len(backend.plans) <= 3 and all(d.uses_delta for p in backend.plans for d in p.decisions)
    assert sum(any(s.chunk for s in p.sites) for p in backend.plans) >= 1
    assert current_prompt_length() is None                                # the block ended with the prefill
    _, plain_cache = run_in_chunks(compiled, ids, CHUNK)                    # no prompt_length(): op default
    assert cache_gap(plain_cache, one_cache) > 1e-2
    torch._dynamo.reset()


def test_a_misaligned_chunk_anchors_at_its_first_row():
    """Chunks of 200 (not a multiple of gamma) equal the per-layer truth of the op given the prompt's length, and
    differ from one call over the prompt in the rows of each chunk's first gamma block (kernels/rule.py)."""
    model, ids, backend, compiled = compiled_llama(seed=14)
    output, cache = deltapass.prefill(compiled, ids, chunk=200)
    truth, truth_cache = run_in_chunks(twin(model, "deltapass_prompt_600"), ids, 200)
    torch.testing.assert_close(output.logits[:, -1], truth[:, -1], atol=1e-4, rtol=1e-4)
    assert_caches_close(cache, truth_cache)
    one_call, one_cache = run_in_chunks(twin(model, "deltapass_prompt_600"), ids, N)
    assert cache_gap(cache, one_cache) > 1e-3
    torch._dynamo.reset()


def test_bad_arguments_name_the_argument():
    model = build("llama", "sdpa")
    ids = torch.randint(0, 96, (1, 40))
    for chunk, error in ((0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError), ("8", TypeError)):
        with pytest.raises(error, match=f"chunk must be .*got chunk={chunk!r}"):
            deltapass.prefill(model, ids, chunk=chunk)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        deltapass.prefill(model, ids.float(), chunk=16)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor \[batch, cached \+ new tokens\]"):
        deltapass.prefill(model, ids, chunk=16, attention_mask=torch.ones(1, 39))
    with pytest.raises(ValueError, match="cache must be a transformers Cache"):
        deltapass.prefill(model, ids, chunk=16, cache=[])
    for bad, error in ((0, ValueError), (2**31, ValueError), (True, TypeError), (600.0, TypeError)):
        with pytest.raises(error, match=f"prompt_length=.*{bad!r}"):
            with prompt_length(bad):
                pass
    q, k, v = (torch.randn(1, 2, n, 64) for n in (64, 300, 300))
    with prompt_length(200), pytest.raises(ValueError, match="prompt_length must be >= the key length N_k=300"):
        delta_attention(q, k, v, **SMALL.op_arguments())


def test_prompt_length_is_read_per_call_and_refused_under_cuda_graph_capture(monkeypatch):
    """Inside the block the op takes the block's length (an explicit argument wins); during a CUDA-graph capture
    reading it is an error, since the recording would replay one chunk's value."""
    from deltapass.kernels import reference_delta_attention

    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (96, 320, 320))
    rule = SMALL.op_arguments()

    def truth(length):
        return reference_delta_attention(q.double(), k.double(), v.double(), prompt_length=length, **rule)

    with prompt_length(1000):
        with prompt_length(700):
            assert torch.allclose(delta_attention(q, k, v, **rule).double(), truth(700), atol=2e-5)
        assert current_prompt_length() == 1000
        assert torch.allclose(delta_attention(q, k, v, prompt_length=320, **rule).double(), truth(None), atol=2e-5)
    assert current_prompt_length() is None
    assert (truth(700) - truth(None)).abs().max() > 1e-2                  # the length changes the rows
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    mask = torch.ones(96, 320, dtype=torch.bool).tril(320 - 96)
    with prompt_length(700):
        with pytest.raises(RuntimeError, match="prompt_length=700 .* during a CUDA-graph capture"):
            delta_attention(q, k, v, **rule)
        with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
            torch.ops.deltapass.delta_attention_masked.default(q, k, v, mask, "keep", torch.tensor(True),
                                                               *SMALL.op_arguments().values(), None)
        delta_attention(q, k, v, prompt_length=700, **rule)                 # given explicitly: nothing is read
    delta_attention(q, k, v, **rule)                                        # no block: nothing is read
