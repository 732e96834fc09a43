"""The compiler pass on hand-written attention modules: what it replaces, what it leaves exact, and why."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltapass
from deltapass import DeltaConfig, SiteConfig
from deltapass.kernels import delta_attention

SMALL = SiteConfig(sink=4, window=32, gamma=16)
CONFIG = DeltaConfig(default=SMALL)


class CausalAttention(nn.Module):
    """SDPA attention in the shapes real models use; `gqa` picks how K/V reach the query heads."""

    def __init__(self, dim=128, q_heads=4, kv_heads=2, head_dim=64, gqa="enable_gqa", causal=True,
                 dropout=0.0, reference: SiteConfig | None = None):
        super().__init__()
        self.q = nn.Linear(dim, q_heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, dim)
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.gqa, self.causal, self.dropout, self.reference = gqa, causal, dropout, reference

    def heads(self, x, proj, h):
        b, n, _ = x.shape
        return proj(x).view(b, n, h, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None):
        q = self.heads(x, self.q, self.q_heads)
        kv_source = x if context is None else context
        k = self.heads(kv_source, self.k, self.kv_heads)
        v = self.heads(kv_source, self.v, self.kv_heads)
        if self.reference is not None:   # what the pass should turn this module into
            out = delta_attention(q, k, v, **self.reference.op_arguments())
        else:
            rep = self.q_heads // self.kv_heads
            enable_gqa = self.gqa == "enable_gqa"
            if self.gqa == "repeat_kv":
                b, h, n, d = k.shape
                k = k[:, :, None, :, :].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)
                v = v[:, :, None, :, :].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)
            elif self.gqa == "repeat_interleave":
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=enable_gqa,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class Stack(nn.Module):
    def __init__(self, n_layers=2, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(CausalAttention(**kwargs) for _ in range(n_layers))

    def forward(self, x, context=None):
        for layer in self.layers:
            x = x + layer(x, context)
        return x


def reference_stack(model: Stack, config: DeltaConfig) -> Stack:
    """The same weights with every layer calling delta_attention directly (the per-layer truth)."""
    ref = Stack(n_layers=len(model.layers))
    ref.load_state_dict(model.state_dict())
    for i, layer in enumerate(ref.layers):
        layer.reference = config.for_site(f"layers.{i}", i)
    return ref.eval()


def compile_and_run(model, *inputs, config=CONFIG):
    torch._dynamo.reset()
    backend = deltapass.backend(config)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs)
    return out, backend.plans[-1] if backend.plans else None   # no plan: the pass failed, the graph ran as is


def actions(plan) -> list[str]:
    return [d.action for d in plan.decisions]


@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv", "repeat_interleave"])
def test_causal_sdpa_is_replaced_and_equals_per_layer_delta(gqa):
    torch.manual_seed(0)
    model = Stack(gqa=gqa).eval()
    x = torch.randn(1, 200, 128)
    out, plan = compile_and_run(model, x)
    assert [(s.name, s.layer) for s in plan.sites] == [("layers.0", 0), ("layers.1", 1)]
    assert actions(plan) == ["delta", "delta"]
    if gqa != "enable_gqa":
        assert all("grouped-query expansion" in " ".join(s.notes) for s in plan.sites)
    with torch.no_grad():
        truth = reference_stack(model, CONFIG)(x)
        exact = model(x)
    torch.testing.assert_close(out, truth, atol=2e-4, rtol=2e-4)
    assert (out - exact).abs().max() > 1e-3       # the Δ approximation really ran


def test_short_sequence_is_exact():
    torch.manual_seed(1)
    model = Stack().eval()
    x = torch.randn(2, 30, 128)                      # N <= sink + window
    out, plan = compile_and_run(model, x)
    assert actions(plan) == ["exact_causal", "exact_causal"]
    assert "sink + window (36) covers all 30 tokens" in plan.decisions[0].reason
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kwargs,inputs,reason", [
    (dict(causal=False), lambda: (torch.randn(1, 64, 128),), "is_causal=False"),
    (dict(), lambda: (torch.randn(1, 64, 128), torch.randn(1, 48, 128)), "query length 64 != key length 48"),
    (dict(), lambda: (torch.randn(1, 1, 128),), "decode step"),
    (dict(head_dim=32), lambda: (torch.randn(1, 64, 128),), "head_dim=32"),
])
def test_non_causal_self_attention_stays_exact(kwargs, inputs, reason):
    torch.manual_seed(2)
    model = Stack(**kwargs).eval()
    args = inputs()
    out, plan = compile_and_run(model, *args)
    assert plan.sites and actions(plan) == ["untouched"] * len(plan.sites)
    assert all(reason in d.reason for d in plan.decisions), [d.reason for d in plan.decisions]
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        report = deltapass.explain(model, *args, config=CONFIG)
    assert [s.replaced for s in report.sites] == [False, False]
    assert reason in str(report)


def test_training_dropout_stays_exact():
    model = Stack(dropout=0.1).train()
    report = deltapass.explain(model, torch.randn(1, 64, 128), config=CONFIG)
    assert report.sites and not report.replaced
    assert all("dropout_p=0.1" in s.reason for s in report.sites)


def test_explicit_mask_input_is_checked_per_call():
    class Masked(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    causal = torch.ones(96, 96, dtype=torch.bool).tril()
    with torch.no_grad():
        report = deltapass.explain(Masked(), q, k, v, causal, config=CONFIG)
    assert len(report.sites) == 1 and report.sites[0].replaced and report.sites[0].mask_checked_per_call
    assert "mask comes from the inputs" in report.sites[0].notes[0]
    torch._dynamo.reset()
    compiled = torch.compile(Masked(), backend=deltapass.backend(CONFIG))
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, causal), delta_attention(q, k, v, **SMALL.op_arguments()))
        window = causal & torch.ones(96, 96, dtype=torch.bool).triu(-8)
        torch.testing.assert_close(compiled(q, k, v, window), Masked()(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_per_site_config_by_name_and_layer():
    torch.manual_seed(3)
    model = Stack(n_layers=3).eval()
    x = torch.randn(1, 200, 128)
    config = DeltaConfig(default=SMALL, sites={"layers.1": SiteConfig(sink=0, window=16, gamma=8,
                                                                       correction="recompute")},
                         layers={2: SiteConfig(correction="dense")})
    out, plan = compile_and_run(model, x, config=config)
    assert actions(plan) == ["delta", "delta", "exact_causal"]
    assert "configured dense" in plan.decisions[2].reason
    with torch.no_grad():
        truth = reference_stack(model, DeltaConfig(default=SMALL, sites=config.sites))
        truth.layers[2].reference = None             # layer 2 stays exact SDPA
        torch.testing.assert_close(out, truth(x), atol=2e-4, rtol=2e-4)
    with torch.no_grad():
        report = deltapass.explain(model, x, config=config)
    assert [s.replaced for s in report.sites] == [True, True, False]
    assert "recompute" in str(report)


def test_compile_mode_and_options_reach_inductor(monkeypatch):
    """torch.compile(..., backend=..., mode=/options=) must rewrite as usual and hand both to Inductor."""
    import torch._inductor.compile_fx as inductor_compile

    patches_seen = []
    real_compile_fx = inductor_compile.compile_fx

    def recording_compile_fx(gm, inputs, *args, config_patches=None, **kwargs):
        patches_seen.append(dict(config_patches or {}))
        return real_compile_fx(gm, inputs, *args, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(inductor_compile, "compile_fx", recording_compile_fx)
    torch.manual_seed(5)
    model = Stack().eval()
    x = torch.randn(1, 200, 128)
    backend = deltapass.backend(CONFIG)
    with torch.no_grad():
        truth = reference_stack(model, CONFIG)(x)
        for mode, options in [("reduce-overhead", None), (None, {"epilogue_fusion": False})]:
            torch._dynamo.reset()
            patches_seen.clear()
            out = torch.compile(model, backend=backend, mode=mode, options=options)(x)
            assert actions(backend.plans[-1]) == ["delta", "delta"]
            torch.testing.assert_close(out, truth, atol=2e-4, rtol=2e-4)
            expected = options or {"triton.cudagraphs": True}
            # the first call is the backend's; compile_fx then re-enters itself with the patches applied
            assert patches_seen and patches_seen[0].items() >= expected.items(), patches_seen


@pytest.mark.parametrize("make_backend,compile_kwargs,message", [
    (lambda: "delta", dict(mode="fastest"), "mode='fastest'"),     # the entry point forwards them too
    (lambda: deltapass.backend(CONFIG), dict(options={"no_such_option": 1}), "no_such_option"),
    (lambda: deltapass.backend(CONFIG, inner="aot_eager"), dict(mode="reduce-overhead"), "inner='aot_eager'"),
])
def test_bad_compile_mode_or_options_name_the_argument(make_backend, compile_kwargs, message):
    torch._dynamo.reset()
    compiled = torch.compile(Stack().eval(), backend=make_backend(), **compile_kwargs)
    with pytest.raises(Exception, match=message):
        compiled(torch.randn(1, 40, 128))


def test_a_failing_pass_compiles_the_graph_untouched(monkeypatch, caplog):
    def broken(gm, config, sites=None):
        raise RuntimeError("boom")

    monkeypatch.setattr("deltapass.dynamo_backend.rewrite_graph", broken)
    model = Stack().eval()
    x = torch.randn(1, 200, 128)
    with caplog.at_level(logging.WARNING, logger="deltapass.backend"):
        out, _ = compile_and_run(model, x)
    assert "compiling this graph untouched" in caplog.text and "boom" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_config_json_round_trip_and_validation(tmp_path):
    config = DeltaConfig(default=SiteConfig(sink=64, window=256, gamma=32, launch={"block_m": 64}),
                         sites={"model.layers.3.self_attn": SiteConfig(correction="none")},
                         layers={7: SiteConfig(correction="dense")})
    path = tmp_path / "config.json"
    config.to_json(path)
    assert DeltaConfig.from_json(path) == config
    assert DeltaConfig.from_json(config.to_json()) == config
    partial = DeltaConfig.from_dict({"default": {"window": 512}, "layers": {"2": {"gamma": 16}}})
    assert partial.for_site("x", 2) == SiteConfig(window=512, gamma=16)
    with pytest.raises(ValueError, match=r"layers\['2'\]: gamma must be >= 1, got gamma=0"):
        DeltaConfig.from_dict({"layers": {"2": {"gamma": 0}}})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['windw'\] in default"):
        DeltaConfig.from_dict({"default": {"windw": 3}})
    with pytest.raises(ValueError, match=r"correction must be one of .* got correction='fast'"):
        SiteConfig(correction="fast")
    with pytest.raises(ValueError, match=r"block_m must be a power of two"):
        SiteConfig(launch={"block_m": 24})
