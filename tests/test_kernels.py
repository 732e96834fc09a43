"""The Triton kernels (run by Triton's interpreter on CPU) against the float64 reference of the rule."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deltapass.kernels import DeltaPlan, LaunchConfig, delta_attention, reference_delta_attention
from deltapass.kernels.op import _interpreting
from deltapass.kernels.triton_delta import launch_delta_attention

from helpers import max_abs_err, random_qkv

pytestmark = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest)")

# (N, Hq, Hkv, D, sink, window, gamma, launch): odd N, GQA 1:1, 3:1, 4:1, 8:1, sink 0,
# window >= N, gamma not dividing N or the tiles, padded head dims, several tile shapes.
# (Under delta/recompute every row of N=97 is a tail row, so that case checks sparse rows in "none" only.)
CASES = {
    "n97-mha": (97, 2, 2, 64, 4, 16, 8, LaunchConfig(32, 16, 4, 1, 16, 16, 4, 1)),
    "n1000-gqa3": (1000, 9, 3, 64, 16, 64, 48, LaunchConfig(128, 64, 4, 1, 64, 64, 4, 1)),
    "n4099-gqa4": (4099, 4, 1, 64, 64, 256, 64, LaunchConfig(256, 64, 4, 1, 128, 128, 4, 1)),
    "n300-gqa8-sink0": (300, 8, 1, 64, 0, 32, 16, LaunchConfig(64, 16, 4, 1, 64, 32, 4, 1)),
    "n200-window-ge-n": (200, 4, 2, 64, 0, 512, 16, LaunchConfig(32, 32, 4, 1, 32, 32, 4, 1)),
    "n333-d80-gamma100": (333, 3, 1, 80, 8, 40, 100, LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1)),
    "n260-d96-sink-only": (260, 2, 1, 96, 24, 0, 32, LaunchConfig(16, 16, 4, 1, 16, 16, 4, 1)),
    "n150-gamma1": (150, 2, 1, 128, 4, 8, 1, LaunchConfig(32, 32, 4, 1, 32, 32, 4, 1)),
    "n181-d256-gqa2": (181, 4, 2, 256, 8, 16, 16, LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1)),
}


def run_poisoned(q, k, v, sink, window, gamma, correction, launch):
    """Run both kernels into NaN-filled output and workspace so unwritten rows show."""
    plan = DeltaPlan(q.shape[2], sink, window, gamma, correction)
    out = torch.full_like(q, float("nan"))
    delta = torch.full((q.shape[0], q.shape[1], max(plan.n_samples, 1), q.shape[3]), float("nan"))
    launch_delta_attention(q, k, v, out, plan, 1.0 / math.sqrt(q.shape[-1]), launch, delta=delta)
    return out


def exact_rows(plan: DeltaPlan) -> torch.Tensor:
    """Rows the rule computes with dense attention."""
    if plan.exact:
        return torch.arange(plan.n)
    return plan.dense_row_positions()


@pytest.mark.parametrize("correction", ["delta", "recompute", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_fp64_reference(case, correction):
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    seed = hash((case, correction)) % 2**31
    q, k, v = random_qkv(1, hq, hkv, n, d, torch.float32, seed)
    out = run_poisoned(q, k, v, sink, window, gamma, correction, launch)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), sink=sink, window=window,
                                      gamma=gamma, correction=correction)
    assert not out.isnan().any(), "some output rows were never written"
    assert max_abs_err(out, truth) < 2e-5


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3] in (64, 128)])
def test_pointer_loads_match_fp64_reference(case):
    """The plain-pointer K/V path (used where tensor descriptors cannot be) obeys the same rule."""
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    q, k, v = random_qkv(1, hq, hkv, n, d, torch.float32, seed=99 + n)
    out = run_poisoned(q, k, v, sink, window, gamma, "delta", dataclasses.replace(launch, kv_tma=-1))
    truth = reference_delta_attention(q.double(), k.double(), v.double(), sink=sink, window=window,
                                      gamma=gamma, correction="delta")
    assert not out.isnan().any()
    assert max_abs_err(out, truth) < 2e-5


@pytest.mark.parametrize("correction", ["delta", "recompute"])
@pytest.mark.parametrize("case", ["n1000-gqa3", "n97-mha", "n200-window-ge-n", "n333-d80-gamma100"])
def test_fp16_within_flash_criterion(case, correction):
    """Exact rows: error vs fp64 <= 2x PyTorch's own fp16 error; other rows held to the same bound."""
    n, hq, hkv, d, sink, window, gamma, launch = CASES[case]
    q, k, v = random_qkv(2, hq, hkv, n, d, torch.float16, seed=1234 + n)
    out = run_poisoned(q, k, v, sink, window, gamma, correction, launch)
    kwargs = dict(sink=sink, window=window, gamma=gamma, correction=correction)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    torch_fp16 = reference_delta_attention(q, k, v, **kwargs)
    assert not out.isnan().any()
    rows = exact_rows(DeltaPlan(n, sink, window, gamma, correction))
    assert rows.numel() > 0
    kernel_err = max_abs_err(out[:, :, rows], truth[:, :, rows])
    torch_err = max_abs_err(torch_fp16[:, :, rows], truth[:, :, rows])
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)
    assert max_abs_err(out, truth) <= 2 * max_abs_err(torch_fp16, truth)


def test_batched_strided_inputs_and_op_entry():
    """The public op on non-contiguous [B, N, H, D]-transposed inputs equals the reference."""
    n, hq, hkv, d = 130, 6, 2, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    kwargs = dict(sink=4, window=24, gamma=12, correction="delta")
    out = delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_abs_err(out, truth) < 2e-5


def test_custom_scale():
    q, k, v = random_qkv(1, 2, 1, 90, 64, torch.float32, seed=3)
    kwargs = dict(sink=2, window=10, gamma=8, correction="delta", scale=0.3)
    out = delta_attention(q, k, v, **kwargs, block_m=32, block_n=16, dense_block_m=32, dense_block_n=16)
    truth = reference_delta_attention(q.double(), k.double(), v.double(), **kwargs)
    assert max_abs_err(out, truth) < 2e-5


def test_op_under_torch_compile_and_opcheck():
    """The custom op's fake impl lets torch.compile carry it; opcheck validates its registration."""
    q, k, v = random_qkv(1, 4, 2, 70, 64, torch.float32, seed=11)
    launch = list(LaunchConfig(32, 16, 4, 1, 32, 16, 4, 1).to_dict().values())
    args = (q, k, v, 4, 16, 8, "delta", None, launch)
    torch.library.opcheck(torch.ops.deltapass.delta_attention.default, args)

    def f(q, k, v):
        return torch.ops.deltapass.delta_attention(q, k, v, 4, 16, 8, "delta", None, launch) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), f(q, k, v))


def test_unequal_lengths_fall_back_to_exact_sdpa():
    """Not a self-attention prefill (k longer than q): exactly SDPA(is_causal=True), as the pass promises."""
    q, _, _ = random_qkv(1, 4, 2, 20, 64, torch.float32, seed=21)
    _, k, v = random_qkv(1, 4, 2, 50, 64, torch.float32, seed=22)
    out = delta_attention(q, k, v, sink=2, window=8, gamma=4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, expected)
