"""The pass on Hugging Face models (random weights, small configs), SDPA and eager attention."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM  # noqa: E402

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


def _delta_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Per-layer truth: the Δ op applied directly where the model attends."""
    out = delta_attention(query, key, value, scale=scaling, **SMALL.op_arguments())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("deltapass_reference", _delta_reference)
# Families whose attention does not go through transformers' AttentionInterface: no per-layer truth model.
NO_INTERFACE = {"falcon"}


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
    report = deltapass.explain(model, ids, config=DeltaConfig(default=SMALL))
    assert len(report.sites) == 2 and len(report.replaced) == 2, str(report)
    assert [s.layer for s in report.sites] == [0, 1]

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL)))(ids).logits
        exact = model(ids).logits
    assert (out - exact).abs().max() > 0.05        # the Δ approximation really ran (50x the tolerance below)
    if family in NO_INTERFACE:
        return
    reference = build(family, "deltapass_reference")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        truth = reference(ids).logits
    # Inductor fuses the rest of the model, so fp32 rounding differs slightly from eager.
    torch.testing.assert_close(out, truth, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_short_prompt_equals_eager_and_generate_matches(attn):
    torch.manual_seed(1)
    model = build("llama", attn)
    ids = torch.randint(0, 96, (1, 40))                 # N <= sink + window: the op is exact
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL)))
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
    report = deltapass.explain(model, ids, config=DeltaConfig(default=SMALL))
    assert len(report.sites) == 2 and not report.replaced, str(report)
    assert all(reason in s.reason for s in report.sites), str(report)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=deltapass.backend(DeltaConfig(default=SMALL)))(ids).logits
        torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_padding_mask_from_inputs_stays_exact():
    model = build("llama", "eager")
    ids = torch.randint(0, 96, (1, 100))
    report = deltapass.explain(model, ids, attention_mask=torch.ones_like(ids), config=DeltaConfig(default=SMALL))
    assert len(report.sites) == 2 and not report.replaced
    assert all("depends on the model's inputs" in s.reason for s in report.sites), str(report)
