"""The pass on Hugging Face models (random weights, small configs), SDPA and eager attention."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import deltapass  # noqa: E402
from deltapass import DeltaConfig, SiteConfig  # noqa: E402
from deltapass.kernels import delta_attention  # noqa: E402

SMALL = SiteConfig(sink=4, window=48, gamma=16)
COMMON = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=1024, initializer_range=0.3)  # peaked attention
FAMILIES = {
    "llama": dict(head_dim=64), "mistral": dict(head_dim=64, sliding_window=None), "qwen2": {},
    "qwen3": dict(head_dim=64), "gemma": dict(head_dim=64), "phi3": dict(pad_token_id=0),
    "gpt2": dict(n_embd=128, n_layer=2, n_head=2, n_positions=1024), "gpt_neox": {},
    "opt": dict(ffn_dim=256, word_embed_proj_dim=128), "falcon": dict(new_decoder_architecture=False),
}


# The families run the rewritten graph through AOT autograd only (the op's fake impl, functionalisation);
# these go through Inductor as users get it by default, which costs a C++ build per model on the CPU.
INDUCTOR_CASES = {("llama", "sdpa"), ("gpt2", "eager")}


def _delta_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per-layer truth: the Δ op applied directly where the model attends at prefill; decode steps exact."""
    if query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = delta_attention(query, key, value, scale=scaling, **SMALL.op_arguments())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("deltapass_reference", _delta_reference)


def keeping(graphs: list):
    """An inner compiler that runs the rewritten graph as is and keeps it in `graphs` for inspection."""
    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return inner


def build(family: str, attn: str, **extra) -> torch.nn.Module:
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES.get(family, {}), **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_causal_site_is_replaced_and_matches_per_layer_delta(family, attn):
    torch.manual_seed(0)
    model = build(family, attn)
    ids = torch.randint(0, 96, (1, 400))             # rows 52..271 are sparse + delta; the last 128 are exact
    with torch.no_grad():
        report = deltapass.explain(model, ids, config=DeltaConfig(default=SMALL))
    assert len(report.sites) == 2 and len(report.replaced) == 2, str(report)
    assert [s.layer for s in report.sites] == [0, 1]

    torch._dynamo.reset()
    inner = "inductor" if (family, attn) in INDUCTOR_CASES else "aot_eager"
    with torch.no_grad():
        out = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL), inner=inner))(ids).logits
        exact = model(ids).logits
    assert (out - exact).abs().max() > 0.05        # the Δ approximation really ran (50x the tolerance below)
    reference = build(family, "deltapass_reference")
    assert reference.config._attn_implementation == "deltapass_reference", family   # not swapped for SDPA
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        truth = reference(ids).logits
    # Inductor fuses the rest of the model, so fp32 rounding differs slightly from eager.
    torch.testing.assert_close(out, truth, atol=1e-3, rtol=1e-3)


def test_a_causal_lms_fingerprint_needs_no_inputs():
    """What the tuner and `deltapass bench` key the cache by: the fingerprint the backend computes for any prompt."""
    from deltapass.explaining import fingerprint

    torch.manual_seed(3)
    model = build("llama", "sdpa")
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = deltapass.explain(model, torch.randint(0, 96, (1, 400)), config=DeltaConfig(default=SMALL))
        assert fingerprint(model) == compiled.fingerprint is not None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_short_prompt_equals_eager_and_generate_matches(attn):
    torch.manual_seed(1)
    model = build("llama", attn)
    ids = torch.randint(0, 96, (1, 40))                 # N <= sink + window: the op is exact
    torch._dynamo.reset()
    compiled = compiled_twin(model, "llama", attn)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        tokens = compiled.generate(ids, max_new_tokens=5, do_sample=False)
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("family,attn,extra,reason", [
    ("gemma3_text", "sdpa", dict(head_dim=64, sliding_window=32), "mask is not causal"),
    ("gemma3_text", "eager", dict(head_dim=64, sliding_window=32), "mask is not causal"),
    ("gemma2", "eager", dict(head_dim=64, sliding_window=32), "soft-capping"),
])
def test_local_and_softcapped_sites_are_reported_and_left_exact(family, attn, extra, reason):
    torch.manual_seed(2)
    model = build(family, attn, **extra)
    ids = torch.randint(0, 96, (1, 100))
    with torch.no_grad():
        report = deltapass.explain(model, ids, config=DeltaConfig(default=SMALL))
    assert len(report.sites) == 2 and not report.replaced, str(report)
    assert all(reason in s.reason for s in report.sites), str(report)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL)))(ids).logits
        torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=1e-4)


def compiled_twin(model: torch.nn.Module, family: str, attn: str) -> torch.nn.Module:
    """A copy compiled in place (nn.Module.compile), so generate()'s own calls go through the backend.

    (torch.compile(model).generate would run the uncompiled model: generate calls the original module.)
    """
    twin = build(family, attn)
    twin.load_state_dict(model.state_dict())
    twin.compile(backend=deltapass.backend(DeltaConfig(default=SMALL)))
    return twin


def _reference_twin(model: torch.nn.Module, family: str = "llama") -> torch.nn.Module:
    twin = build(family, "deltapass_reference")
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_input_mask_is_checked_per_call(attn):
    """A mask from the inputs: Δ when it is all ones (causal), exact attention when it pads."""
    torch.manual_seed(3)
    model = build("llama", attn)
    ids = torch.randint(0, 96, (2, 400))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        report = deltapass.explain(model, ids, attention_mask=ones, config=DeltaConfig(default=SMALL))
    assert len(report.replaced) == 2 and all(s.mask_checked_per_call for s in report.sites), str(report)
    assert "when the input mask is causal" in str(report)

    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL), inner=keeping(graphs)))
    padded = ones.clone()
    padded[1, :37] = 0                                                 # left padding in the second row
    with torch.no_grad():
        out = compiled(ids, attention_mask=ones).logits
        truth = _reference_twin(model)(ids, attention_mask=ones).logits
        torch.testing.assert_close(out, truth, atol=1e-3, rtol=1e-3)
        assert (out - model(ids, attention_mask=ones).logits).abs().max() > 0.05    # Δ really ran
        out = compiled(ids, attention_mask=padded).logits
        exact = model(ids, attention_mask=padded).logits
    # Padded positions' own rows are garbage in both; compare the real tokens.
    torch.testing.assert_close(out[padded.bool()], exact[padded.bool()], atol=1e-4, rtol=1e-4)
    checks = [n for n in graphs[0].graph.nodes if n.target == torch.ops.deltapass.mask_is_causal.default]
    assert len(checks) == 1, "layers sharing one mask must share one check"


def test_generate_runs_delta_prefill_and_exact_decode():
    torch.manual_seed(4)
    model = build("llama", "sdpa")
    ids = torch.randint(0, 96, (1, 400))                               # long enough that Δ changes the prefill
    torch._dynamo.reset()
    compiled = compiled_twin(model, "llama", "sdpa")
    with torch.no_grad():
        tokens = compiled.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        truth = _reference_twin(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                do_sample=False, output_logits=True, return_dict_in_generate=True)
        exact = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    assert torch.equal(tokens.sequences, truth.sequences)
    for got, want in zip(tokens.logits, truth.logits):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert (tokens.logits[0] - exact.logits[0]).abs().max() > 0.05    # the prefill really took Δ


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_dense_is_sdpa_is_causal_and_equals_eager_with_and_without_an_input_mask(attn):
    """The all-dense config: no N x N mask reaches attention; causal input masks take is_causal SDPA."""
    from deltapass import presets

    torch.manual_seed(4)
    model = build("llama", attn)
    ids = torch.randint(0, 96, (2, 300))
    ones = torch.ones_like(ids)
    padded = ones.clone()
    padded[1, :23] = 0
    graphs = []
    torch._dynamo.reset()
    backend = deltapass.backend(presets.ALL_DENSE, inner=keeping(graphs))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for mask in (None, ones, padded):
            out = compiled(ids, attention_mask=mask).logits
            exact = model(ids, attention_mask=mask).logits
            keep = slice(None) if mask is None else mask.bool()
            torch.testing.assert_close(out[keep], exact[keep], atol=1e-4, rtol=1e-4)
    assert [d.action for d in backend.plans[0].decisions] == ["exact_causal"] * 2, backend.plans[0].decisions
    assert {d.action for p in backend.plans[1:] for d in p.decisions} == {"exact_checked"}
    unmasked = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    sdpa = [n for n in unmasked if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 2 and all(n.kwargs["is_causal"] and len(n.args) == 3 for n in sdpa)
    torch._dynamo.reset()


def test_compiled_model_hands_the_op_transposed_views_and_gets_its_layout_back(monkeypatch):
    """Under Inductor the op gets q/k/v as transposed views of the [B, N, H, D] projections (the layout the
    Hopper kernels read in place, BENCHMARKS.md), and returns its output in q's layout, as its fake impl says."""
    from deltapass.kernels import op

    seen, forward = [], op._forward

    def recording(q, k, v, *args):
        out = forward(q, k, v, *args)
        seen.append((q.shape, q.stride(), k.stride(), out.stride()))
        return out

    monkeypatch.setattr(op, "_forward", recording)
    torch.manual_seed(0)
    model = build("llama", "sdpa", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL), inner="inductor"))(
            torch.randint(0, 96, (1, 300)))
    assert len(seen) == 2
    for (b, h, n, d), q_stride, k_stride, out_stride in seen:
        assert q_stride == (n * h * d, d, h * d, 1) and k_stride == (n * 2 * d, d, 2 * d, 1)
        assert out_stride == q_stride


# Two length buckets, each with its own config: (bucket, config); 400 tokens fall in the first, 1100 in the second.
BUCKETS = ((1024, SiteConfig(sink=4, window=48, gamma=16)), (2048, SiteConfig(sink=8, window=96, gamma=32)))


def _bucketed_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per-layer truth under BUCKETS: the Δ op with the config of the prompt's length bucket."""
    config = next(c for bucket, c in BUCKETS if key.shape[2] <= bucket)
    out = delta_attention(query, key, value, scale=scaling, **config.op_arguments())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("deltapass_bucketed_reference", _bucketed_reference)


@pytest.mark.parametrize("dynamic,source", [(True, "argument"), (True, "cache"), (None, "cache")])
def test_dynamic_shapes_keep_delta_with_each_lengths_config(tmp_path, dynamic, source):
    """dynamic=True (Dynamo restarts its analysis on a transformers model: the pass must let that through, not
    compile the graph untouched) and automatic dynamic shapes: every length runs Δ with its own config."""
    from deltapass.cache import CacheEntry, HardwareKey, TunedConfigCache

    torch.manual_seed(5)
    model = build("llama", "sdpa")
    lengths = (400, 1100, 300)
    if source == "cache":
        cache = TunedConfigCache(tmp_path)
        with torch.no_grad():
            fingerprint = deltapass.explain(model, torch.randint(0, 96, (1, 64)),
                                            backend=deltapass.backend(cache=False)).fingerprint
        for bucket, config in BUCKETS:
            cache.save(CacheEntry(HardwareKey.current("cpu"), fingerprint, bucket, DeltaConfig(default=config),
                                  meta={"study": "test"}))
        backend = deltapass.backend(cache=cache, inner="aot_eager")
        truth_model = build("llama", "deltapass_bucketed_reference")
    else:
        backend = deltapass.backend(DeltaConfig(default=SMALL), inner="aot_eager")
        truth_model = build("llama", "deltapass_reference")
    truth_model.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    for n in lengths:
        ids = torch.randint(0, 96, (1, n))
        with torch.no_grad():
            out, truth, exact = compiled(ids).logits, truth_model(ids).logits, model(ids).logits
        torch.testing.assert_close(out, truth, atol=1e-3, rtol=1e-3, msg=f"N={n}")
        assert (out - exact).abs().max() > 0.05, f"N={n}: Δ did not run"
    assert backend.plans and all(sum(d.uses_delta for d in p.decisions) == 2 for p in backend.plans)
    if dynamic:       # one graph per bucket at most, not one per length
        assert len(backend.plans) <= (2 if source == "cache" else 1), len(backend.plans)
    torch._dynamo.reset()
