"""The backend's choice of config: given, switched by the tuner, or the tuned entry of the prompt's length bucket."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_pass import Stack, reference_stack

import deltapass
from deltapass import DeltaConfig, SiteConfig
from deltapass.cache import CacheEntry, HardwareKey, TunedConfigCache
from deltapass.kernels import delta_attention

# Large tiles: fewer programs for Triton's interpreter at the lengths bucket tests need (> 1024).
TILES = {"block_m": 128, "block_n": 64}
CONFIG_A = DeltaConfig(default=SiteConfig(sink=16, window=32, gamma=16, correction="none", launch=TILES))
CONFIG_B = DeltaConfig(default=SiteConfig(sink=4, window=64, gamma=16, correction="none", launch=TILES))


class Causal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """These tests are about which config runs, not the kernels: the op's exact PyTorch path is enough and fast."""
    import deltapass.kernels.op as op

    monkeypatch.setattr(op, "_interpreting", lambda: False)


def qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 64, generator=g) for _ in range(3))


def with_config(config: DeltaConfig, q, k, v):
    return delta_attention(q, k, v, **config.default.op_arguments())


def fingerprint_of(model, *inputs) -> str:
    with torch.no_grad():
        return deltapass.explain(model, *inputs, backend=deltapass.backend(cache=False)).fingerprint


def save(cache: TunedConfigCache, fingerprint: str, bucket: int, config: DeltaConfig) -> None:
    cache.save(CacheEntry(HardwareKey.current("cpu"), fingerprint, bucket, config, meta={"study": "test"}))


@pytest.mark.parametrize("dynamic", [False, None, True])
def test_the_tuned_config_follows_the_prompt_length(tmp_path, dynamic):
    """Entries for the 1024 and 2048 buckets: every call runs its own bucket's config, in every shape mode."""
    torch.manual_seed(3)
    model = Stack().eval()
    cache = TunedConfigCache(tmp_path)
    fingerprint = fingerprint_of(model, torch.randn(1, 64, 128))
    save(cache, fingerprint, 1024, CONFIG_A)
    save(cache, fingerprint, 2048, CONFIG_B)
    truth = {id(c): reference_stack(model, c) for c in (CONFIG_A, CONFIG_B)}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=deltapass.backend(cache=cache, inner="eager"), dynamic=dynamic)
    for n, config in [(200, CONFIG_A), (1100, CONFIG_B), (300, CONFIG_A), (1300, CONFIG_B)]:
        x = torch.randn(1, n, 128)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), truth[id(config)](x), atol=2e-4, rtol=2e-4, msg=f"N={n}")
    torch._dynamo.reset()


def test_lengths_without_an_entry_get_the_fallback_and_one_warning(tmp_path, caplog):
    cache = TunedConfigCache(tmp_path)
    save(cache, fingerprint_of(Causal(), *qkv(200)), 1024, CONFIG_A)
    backend = deltapass.backend(cache=cache, inner="eager", fallback=CONFIG_B)
    torch._dynamo.reset()
    compiled = torch.compile(Causal(), backend=backend, dynamic=False)
    with caplog.at_level(logging.WARNING, logger="deltapass"), torch.no_grad():
        q, k, v = qkv(1500)
        torch.testing.assert_close(compiled(q, k, v), with_config(CONFIG_B, q, k, v), atol=1e-5, rtol=1e-5)
        compiled(*qkv(1600))                       # same bucket: no second warning
        compiled(*qkv(200))                        # the tuned bucket: the entry, announced once with its path
        compiled(*qkv(201))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "no tuned config for 1500 tokens (bucket 2048); the nearest tuned bucket is 1024" in warnings[0]
    assert "deltapass tune --length 1500" in warnings[0]
    assert warnings[1].startswith(f"using tuned config {tmp_path}") and "(bucket 1024) for 200 tokens" in warnings[1]
    assert [p.choice.source for p in backend.plans] == ["fallback", "fallback", "cache", "cache"]
    torch._dynamo.reset()


def test_the_fingerprint_identifies_the_weights_not_the_length():
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(1, 64, 128)
    same = fingerprint_of(model, x)
    assert fingerprint_of(model, torch.randn(2, 100, 128)) == same
    other = Stack().eval()                          # same architecture, other weights
    assert fingerprint_of(other, x) != same
    with torch.no_grad():
        model.layers[1].o.weight[0, 0] += 1.0       # the first element is always sampled
    changed = fingerprint_of(model, x)
    assert changed != same
    copy = Stack().eval()
    copy.load_state_dict(model.state_dict())
    assert fingerprint_of(copy, x) == changed       # a copy of the same weights: the same model


CONFIG_DENSE = DeltaConfig(default=SiteConfig(correction="dense"))


@pytest.mark.parametrize("switched", [False, True])
def test_using_switches_configs_without_retracing_and_matches_a_fresh_compile(switched):
    """using() runs each config exactly as a fresh compile with it would; switched: one lowering for all configs."""
    torch.manual_seed(1)
    model = Stack().eval()
    x = torch.randn(1, 200, 128)
    lowered = []

    def inner(gm, example_inputs):
        lowered.append(gm)
        return gm.forward

    tuner = deltapass.backend(cache=False, inner=inner, switched=switched)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=tuner, dynamic=False)
    outputs = {}
    runs = [("a", CONFIG_A), ("b", CONFIG_B), ("dense", CONFIG_DENSE), ("a again", CONFIG_A)]
    with torch.no_grad():
        for name, config in runs:
            with tuner.using(config):
                outputs[name] = compiled(x)
        plain = compiled(x)                          # outside using(): the backend's own (fallback) config
    assert len(tuner.plans) == 1                      # traced once
    # Slots: one lowering for every config; otherwise one per distinct set of decisions (fallback, a, b, dense).
    assert len(lowered) == (1 if switched else 4)
    slots = [n for n in lowered[0].graph.nodes if n.target is torch.ops.deltapass.site_slot.default]
    assert len(slots) == (2 if switched else 0)
    for name, config in runs[:3]:
        torch._dynamo.reset()
        with torch.no_grad():
            fresh = torch.compile(model, backend=deltapass.backend(config, inner="eager"))(x)
        assert torch.equal(outputs[name], fresh), name
    assert torch.equal(outputs["a"], outputs["a again"]) and not torch.equal(outputs["a"], outputs["b"])
    with torch.no_grad():
        torch.testing.assert_close(plain, model(x), atol=1e-5, rtol=1e-5)   # paper defaults cover 200 tokens
    torch._dynamo.reset()


@pytest.mark.parametrize("switched", [False, True])
def test_rewritten_graphs_keep_what_dynamo_attached_for_inductor(switched):
    """Inductor finds the parameters (fixed addresses) from the Dynamo graph's meta and placeholder sources;
    CUDA graphs copy every input it does not know as fixed into the recording on each replay."""
    model, x = Stack().eval(), torch.randn(1, 200, 128)
    seen = {}

    def keeping(label):
        def inner(gm, example_inputs):
            seen.setdefault(label, gm)
            return gm.forward
        return inner

    with torch.no_grad():
        for label, backend in (("plain", keeping("plain")),
                               ("delta", deltapass.backend(CONFIG_A, cache=False, inner=keeping("delta"),
                                                           switched=switched))):
            torch._dynamo.reset()
            torch.compile(model, backend=backend, dynamic=False)(x)
    torch._dynamo.reset()
    plain, delta = seen["plain"], seen["delta"]
    assert delta is not plain and delta.meta["dynamo_compile_id"] is not None
    assert delta.meta.keys() == plain.meta.keys()
    sources = [[n._dynamo_source.name for n in gm.graph.find_nodes(op="placeholder")] for gm in (plain, delta)]
    assert sources[0] == sources[1] and any("parameters" in name for name in sources[1])
    assert delta._param_name_to_source == plain._param_name_to_source


@pytest.mark.parametrize("mode, options, cuda_graphs", [(None, None, False), ("reduce-overhead", None, True),
                                                        ("max-autotune-no-cudagraphs", None, False),
                                                        (None, {"triton.cudagraphs": True}, True)])
def test_slotted_graphs_take_cuda_graphs_from_the_mode_and_lower_without_them(mode, options, cuda_graphs):
    """A slotted graph's recording is per config, so the backend makes it; Inductor must not record one too."""
    compiler, graphs = deltapass.backend(switched=True)._slot_compiler(mode, options)
    assert graphs is cuda_graphs
    assert compiler.config.get("triton.cudagraphs") is False


def test_slots_are_not_used_where_a_mask_is_checked_per_call():
    """A mask from the inputs is checked per call, which a slot cannot do: such graphs compile per config."""
    class Masked(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = qkv(150, seed=3)
    mask = torch.ones(150, 150, dtype=torch.bool).tril()
    mask[120, 7] = False                             # not causal: the checked op must run exact attention
    lowered = []
    tuner = deltapass.backend(cache=False, inner=lambda gm, _: lowered.append(gm) or gm.forward, switched=True)
    torch._dynamo.reset()
    compiled = torch.compile(Masked(), backend=tuner, dynamic=False)
    with torch.no_grad(), tuner.using(CONFIG_A):
        out = compiled(q, k, v, mask)
    assert not any(n.target is torch.ops.deltapass.site_slot.default for gm in lowered for n in gm.graph.nodes)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_using_refuses_dynamic_graphs():
    tuner = deltapass.backend(cache=False, inner="eager")
    torch._dynamo.reset()
    compiled = torch.compile(Stack().eval(), backend=tuner, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(1, 100, 128))
        with tuner.using(CONFIG_A), pytest.raises(RuntimeError, match="dynamic=False"):
            compiled(torch.randn(1, 120, 128))
    torch._dynamo.reset()


def test_dense_sites_become_sdpa_is_causal_without_a_mask():
    """A proven-causal site configured dense is SDPA(is_causal=True): no N x N mask, equal to eager."""
    class MaskedByHand(nn.Module):
        def forward(self, q, k, v):
            n = q.shape[2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = qkv(96)
    torch._dynamo.reset()
    dense = DeltaConfig(default=SiteConfig(correction="dense"))
    with torch.no_grad():
        out = torch.compile(MaskedByHand(), backend=deltapass.backend(dense, inner=capture))(q, k, v)
        torch.testing.assert_close(out, MaskedByHand()(q, k, v), atol=1e-6, rtol=1e-6)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    sdpa = [n for n in calls if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 1 and sdpa[0].kwargs["is_causal"] is True and len(sdpa[0].args) == 3
    assert not any(n.target in (torch.ones, torch.tril) or getattr(n.target, "__name__", "") == "tril"
                   for n in calls), [n.target for n in calls]
    torch._dynamo.reset()


def test_explain_names_the_config_source_and_the_grad_mode(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    q, k, v = qkv(256)
    save(TunedConfigCache(), fingerprint_of(Causal(), q, k, v), 1024, CONFIG_A)
    with torch.no_grad():
        report = deltapass.explain(Causal(), q, k, v)
    assert report.choice.source == "cache" and str(tmp_path) in str(report)
    assert [s.action for s in report.sites] == ["delta"] and "none sink=16 window=32" in str(report)
    with torch.no_grad():
        assert deltapass.explain(Causal(), q, k, v, config=CONFIG_B).choice.source == "argument"
    q.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="deltapass"):
        report = deltapass.explain(Causal(), q, k, v)
    assert [s.action for s in report.sites] == ["untouched"] and "require grad" in str(report)
    assert "wrap inference in torch.no_grad()" in caplog.text


def test_overrides_that_match_no_site_are_reported(caplog):
    config = DeltaConfig(default=CONFIG_A.default, layers={7: SiteConfig(correction="dense")},
                         sites={"layers.9": SiteConfig(correction="dense")})
    with caplog.at_level(logging.WARNING, logger="deltapass"), torch.no_grad():
        report = deltapass.explain(Stack().eval(), torch.randn(1, 64, 128), config=config)
    assert "layers['7'] matches no attention layer" in str(report)
    assert "sites['layers.9'] matches no attention site" in str(report)
    assert "match no attention site" in caplog.text


def test_the_entry_point_uses_the_tuned_entry(tmp_path, monkeypatch):
    """backend="delta" reads the cache: with an entry for this model and bucket, Δ really runs."""
    monkeypatch.setenv("DELTAPASS_CACHE_DIR", str(tmp_path))
    torch.manual_seed(2)
    model = Stack().eval()
    x = torch.randn(1, 200, 128)
    save(TunedConfigCache(), fingerprint_of(model, x), 1024, CONFIG_A)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="delta")(x)
        torch.testing.assert_close(out, reference_stack(model, CONFIG_A)(x), atol=2e-4, rtol=2e-4)
        assert (out - model(x)).abs().max() > 1e-3
    torch._dynamo.reset()


def test_explain_says_so_when_dynamo_stops_tracing():
    """Past Dynamo's recompile limit the model runs eagerly: explain() must not return an empty report."""
    model = Stack().eval()
    x = torch.randn(1, 64, 128)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(2):
            assert deltapass.explain(model, x).sites
        with pytest.raises(RuntimeError, match="recompile_limit"):
            deltapass.explain(model, x)
    torch._dynamo.reset()
