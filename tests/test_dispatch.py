"""Which kernels run a prefill (kernels/dispatch.py), checked where no Hopper GPU is present.

The Hopper kernels themselves only run on an sm_90 GPU (Triton's interpreter does not run Gluon);
benchmarks/check_kernels_gpu.py checks them there against the float64 reference of the rule.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from deltapass.kernels import LaunchConfig, delta_attention
from deltapass.kernels.dispatch import _launch_reason, hopper_reason, launch_delta
from deltapass.kernels.rule import DeltaPlan


def qkv(n=70, hq=4, hkv=2, d=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n * 31 + hq)
    return [torch.randn(1, h, n, d, generator=gen, dtype=dtype) for h in (hq, hkv, hkv)]


def test_cpu_inputs_never_take_the_hopper_kernels():
    assert "need an sm_90 GPU" in hopper_reason(*qkv(), LaunchConfig())


def test_hopper_required_where_it_cannot_run_names_the_parameter():
    with pytest.raises(ValueError, match=r"launch parameter hopper=1, but the Hopper kernels need an sm_90 GPU"):
        delta_attention(*qkv(), sink=4, window=8, gamma=8, hopper=1)


def test_launch_delta_requiring_hopper_raises_before_any_kernel_runs():
    q, k, v = qkv(dtype=torch.float16)
    plan = DeltaPlan(70, 4, 8, 8, "delta")
    with pytest.raises(ValueError, match="hopper=1"):
        launch_delta(q, k, v, torch.empty_like(q), plan, 0.125, LaunchConfig(hopper=1))


@pytest.mark.parametrize("launch, head_dim, match", [
    (LaunchConfig(), 128, ""),
    (LaunchConfig(), 64, ""),
    (LaunchConfig(block_n=64, num_stages=4), 128, ""),
    (LaunchConfig(num_stages=3), 64, ""),
    (LaunchConfig(block_n=32), 128, r"take block_n in \(64, 128\), got block_n=32"),
    (LaunchConfig(dense_block_n=256), 64, r"take dense_block_n in \(64, 128\), got dense_block_n=256"),
    (LaunchConfig(num_stages=3), 128, r"block_n=128 with num_stages=3 needs \d+ bytes of shared memory"),
    (LaunchConfig(kv_tma=-1), 128, r"kv_tma=-1 asks for plain K/V loads"),
])
def test_launch_parameters_that_fit_the_hopper_kernels(launch, head_dim, match):
    reason = _launch_reason(launch, head_dim)
    assert re.search(match, reason) if match else reason == "", reason


def test_hopper_path_reads_model_layouts_in_place_and_copies_what_tma_cannot_address(monkeypatch):
    """The Hopper kernels get one sequence at a time; the transposed [B, N, H, D] views a compiled model passes
    go in as they are (TMA addresses them), and so does a strided output. What TMA cannot address (a
    misaligned base, a row stride off 16 bytes) goes in as an aligned contiguous copy.

    The kernels need an sm_90 GPU, so a stand-in computes the reference on what it is handed and
    records the layouts; the whole result must still be the rule's for every sequence.
    """
    from deltapass.kernels import dispatch, hopper_delta, reference_delta_attention
    from deltapass.kernels.triton_delta import tma_aligned

    seen = []

    def stand_in(q, k, v, out, plan, scale, delta, **tiles):
        seen.append((q.shape[0], q.is_contiguous(), k.is_contiguous(), v.is_contiguous(), out.is_contiguous(),
                     tma_aligned(q) and tma_aligned(k) and tma_aligned(v), tiles["block_n"], tiles["stages"]))
        out.copy_(reference_delta_attention(q, k, v, sink=plan.sink, window=plan.window, gamma=plan.gamma,
                                            correction=plan.correction, scale=scale))
        return out

    monkeypatch.setattr(dispatch, "hopper_reason", lambda *args: "")
    monkeypatch.setattr(hopper_delta, "launch_hopper_delta_attention", stand_in)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 90, h, 64, generator=gen).transpose(1, 2) for h in (6, 2, 2))
    plan = DeltaPlan(90, 4, 16, 8, "delta")
    truth = reference_delta_attention(q.double(), k.double(), v.double(), sink=4, window=16, gamma=8,
                                      correction="delta", scale=0.125)
    out = torch.full((3, 90, 6, 64), float("nan")).transpose(1, 2)
    dispatch.launch_delta(q, k, v, out, plan, 0.125, LaunchConfig(block_n=64, num_stages=3))
    assert seen == [(1, False, False, False, False, True, 64, 3)] * 3
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)

    # A contiguous q whose base is not 16-byte aligned (one float into its storage) goes in as an aligned copy.
    seen.clear()
    q_odd = torch.randn(1 + q[:1].numel(), generator=gen)[1:].view(1, 6, 90, 64)
    q_odd.copy_(q[:1])
    assert q_odd.is_contiguous() and not tma_aligned(q_odd)
    out = torch.full(q_odd.shape, float("nan"))
    k1, v1 = k[:1].contiguous(), v[:1].contiguous()
    dispatch.launch_delta(q_odd, k1, v1, out, plan, 0.125, LaunchConfig(block_n=64, num_stages=3))
    assert seen == [(1, True, True, True, True, True, 64, 3)]
    torch.testing.assert_close(out.double(), truth[:1], atol=1e-5, rtol=1e-5)

    # Rows 66 floats apart (264 bytes, not a multiple of 16): TMA cannot step through them, so a copy.
    seen.clear()
    q_wide = torch.zeros(1, 6, 90, 66)
    q_wide[..., :64] = q[:1]
    dispatch.launch_delta(q_wide[..., :64], k1, v1, out, plan, 0.125, LaunchConfig(block_n=64, num_stages=3))
    assert seen == [(1, True, True, True, True, True, 64, 3)]
    torch.testing.assert_close(out.double(), truth[:1], atol=1e-5, rtol=1e-5)


@pytest.fixture
def an_sm90_device(monkeypatch):
    """A CUDA device that reports sm_90, for the checks that read no tensor (no GPU is touched)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return torch.device("cuda", 0)


def test_kernels_for_names_an_unchecked_triton_release(an_sm90_device, monkeypatch):
    """A user on a Triton release no GPU checked the Hopper kernels with is told so, with the checked ones."""
    import triton

    from deltapass.kernels.dispatch import HOPPER_TRITON, kernels_for

    monkeypatch.setattr(triton, "__version__", "3.10.0")
    said = kernels_for(an_sm90_device, torch.bfloat16, 128, LaunchConfig())
    checked = ", ".join(release + "x" for release in HOPPER_TRITON)
    assert said == ("the Triton kernels (Hopper kernels off: Triton 3.10.0 is not a release a GPU checked them on "
                    f"(checked: {checked}))"), said
    assert "hopper=-1" in kernels_for(an_sm90_device, torch.bfloat16, 128, LaunchConfig(hopper=-1))
    assert "float16 or bfloat16, got torch.float32" in kernels_for(an_sm90_device, torch.float32, 128,
                                                                    LaunchConfig())
    assert "head dims (64, 128), got 96" in kernels_for(an_sm90_device, torch.bfloat16, 96, LaunchConfig())
    monkeypatch.setattr(triton, "__version__", HOPPER_TRITON[0] + "0")
    assert kernels_for(an_sm90_device, torch.bfloat16, 128, LaunchConfig()).startswith("the Hopper kernels")
    assert "whole prompts only, and these sites are chunks" in kernels_for(an_sm90_device, torch.bfloat16, 128,
                                                                          LaunchConfig(), chunk=True)


def test_explain_says_which_kernels_the_delta_sites_run():
    import torch.nn.functional as F

    import deltapass

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(n=300)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    torch._dynamo.reset()
    with torch.no_grad():
        report = deltapass.explain(Causal(), q, k, v, config=deltapass.DeltaConfig(
            default=deltapass.SiteConfig(sink=4, window=32, gamma=16)))
    expected = ("the Triton kernels in Triton's interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
                else "the exact float32 reference of the rule")
    assert report.sites[0].kernels.startswith(expected), report.sites[0].kernels
    assert f"Δ sites run {report.sites[0].kernels}" in str(report)
