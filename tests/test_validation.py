"""Bad input gets an error that names the argument and the value."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltapass.switching  # noqa: F401  (registers deltapass::site_slot)
from deltapass.kernels import LaunchConfig, delta_attention, unsupported_reason
from deltapass.kernels.launch import HOPPER_DEFAULT, default_launch

ROOT = Path(__file__).resolve().parents[1]


def qkv(hq=4, hkv=2, n=32, d=64, dtype=torch.float32):
    return (torch.randn(1, hq, n, d, dtype=dtype), torch.randn(1, hkv, n, d, dtype=dtype),
            torch.randn(1, hkv, n, d, dtype=dtype))


RULE = dict(sink=4, window=8, gamma=8)


@pytest.mark.parametrize("make,match", [
    (lambda: (*qkv()[:1], torch.randn(2, 2, 32, 64), torch.randn(2, 2, 32, 64)), r"in batch or head_dim"),
    (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 32, 64, dtype=torch.float16)), r"share a dtype"),
    (lambda: (qkv()[0], torch.randn(1, 2, 32, 64, device="meta"), qkv()[2]), r"one device"),
    (lambda: qkv(hq=6, hkv=4), r"Hq=6, Hkv=4"),
    (lambda: qkv(d=48), r"head_dim=48"),
    (lambda: qkv(dtype=torch.float64), r"q\.dtype .* torch\.float64"),
    (lambda: (torch.randn(4, 32, 64), *qkv()[1:]), r"q must be 4-D"),
    (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 32, 128)), r"k and v must have the same shape"),
])
def test_bad_tensors(make, match):
    with pytest.raises(ValueError, match=match):
        delta_attention(*make(), **RULE)


def reason_for(q_shape, k_shape, v_shape=None, dtypes=(torch.float16,) * 3, device="cuda", requires_grad=False):
    return unsupported_reason(q_shape, k_shape, k_shape if v_shape is None else v_shape, *dtypes, device,
                              requires_grad=requires_grad)


@pytest.mark.parametrize("args,match", [
    (((1, 4, 32), (1, 2, 32, 64)), r"q must be 4-D"),
    (((1, 4, 32, 64), (1, 2, 32, 64), (1, 2, 32, 128)), r"k and v must have the same shape"),
    (((2, 4, 32, 64), (1, 2, 32, 64)), r"in batch or head_dim"),
    (((1, 4, 32, 64), (1, 2, 32, 80)), r"in batch or head_dim"),
    (((1, 6, 32, 64), (1, 4, 32, 64)), r"Hq=6, Hkv=4"),
    (((1, 4, 32, 48), (1, 2, 32, 48)), r"head_dim=48"),
    (((1, 4, 32, 64), (1, 2, 32, 64), None, (torch.float64,) * 3), r"q\.dtype .* torch\.float64"),
    (((1, 4, 32, 64), (1, 2, 32, 64), None, (torch.float16, torch.bfloat16, torch.float16)), r"share a dtype"),
    (((1, 4, 32, 64), (1, 2, 32, 64), None, (torch.float32,) * 3), r"float32 is supported on CPU only"),
    (((1, 4, 0, 64), (1, 2, 0, 64)), r"sequence length must be >= 1, got N=0"),
    (((1, 4, 40, 64), (1, 2, 30, 64)), r"N_q=40 must be <= key length N_k=30"),
    (((1, 4, 32, 64), (1, 2, 32, 64), None, (torch.float16,) * 3, "cuda", True), r"require grad"),
])
def test_unsupported_reason_on_plain_values(args, match):
    """What the pass calls with FX metadata: plain ints, dtypes and a device type; "" when supported."""
    assert re.search(match, reason_for(*args))
    assert reason_for((1, 8, 32, 128), (1, 2, 32, 128)) == ""
    assert reason_for((1, 8, 1, 128), (1, 2, 300, 128)) == ""             # decode: bottom-right causal
    assert reason_for((1, 4, 32, 64), (1, 2, 32, 64), dtypes=(torch.float32,) * 3, device="cpu") == ""


@pytest.mark.parametrize("shapes", [((1, 6, 32, 64), (1, 4, 32, 64)), ((1, 4, 32, 48), (1, 2, 32, 48)),
                                    ((1, 4, 40, 64), (1, 2, 30, 64)), ((1, 4, 32, 64), (1, 2, 32, 128))])
def test_the_op_raises_the_shared_reason(shapes):
    """check_inputs raises exactly what unsupported_reason says: one statement of the limits."""
    q_shape, k_shape = shapes
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape)
    with pytest.raises(ValueError) as raised:
        delta_attention(q, k, v, **RULE)
    assert str(raised.value) == unsupported_reason(q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, "cpu")


@pytest.mark.parametrize("kwargs,match", [
    (dict(sink=4, window=8, gamma=0), r"gamma must be >= 1, got gamma=0"),
    (dict(sink=-1, window=8, gamma=8), r"sink must be >= 0, got sink=-1"),
    (dict(sink=4, window=-3, gamma=8), r"window must be >= 0, got window=-3"),
    (dict(sink=0, window=0, gamma=8), r"sink \+ window must be >= 1"),
    (dict(sink=4, window=8, gamma=8, correction="lse"), r"correction must be one of .* got correction='lse'"),
    (dict(sink=4, window=8, gamma=8, scale=-1.0), r"scale must be a positive finite float .* scale=-1.0"),
    (dict(sink=2**70, window=8, gamma=8), rf"sink must be <= 2\*\*31 - 1 .* got sink={2**70}"),
    (dict(sink=4, window=2**31, gamma=8), rf"window must be <= 2\*\*31 - 1 .* got window={2**31}"),
    (dict(sink=4, window=8, gamma=2**31), rf"gamma must be <= 2\*\*31 - 1 .* got gamma={2**31}"),
])
def test_bad_rule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        delta_attention(*qkv(), **kwargs)


def test_non_int_rule_argument():
    with pytest.raises(TypeError, match=r"gamma must be an int, got 8.0"):
        delta_attention(*qkv(), sink=4, window=8, gamma=8.0)


@pytest.mark.parametrize("launch,exc,match", [
    (dict(block_q=64), TypeError, r"unknown launch parameter\(s\) \['block_q'\]"),
    (dict(block_m=48), ValueError, r"block_m must be a power of two in \[16, 256\], got 48"),
    (dict(block_m=2**70), ValueError, rf"block_m must be a power of two in \[16, 256\], got {2**70}"),
    (dict(dense_block_n=512), ValueError, r"dense_block_n must be a power of two in \[16, 256\], got 512"),
    (dict(block_n=8), ValueError, r"block_n must be a power of two in \[16, 256\], got 8"),
    (dict(num_warps=3), ValueError, r"num_warps must be 1, 2, 4, 8 or 16, got 3"),
    (dict(dense_num_warps=2**70), ValueError, rf"dense_num_warps must be 1, 2, 4, 8 or 16, got {2**70}"),
    (dict(num_stages=-1), ValueError, r"num_stages must be in 1..8, got -1"),
    (dict(dense_num_stages=9), ValueError, r"dense_num_stages must be in 1..8, got 9"),
    (dict(kv_tma=2), ValueError, r"kv_tma must be -1, 0 or 1, got 2"),
    (dict(hopper=2), ValueError, r"hopper must be -1, 0 or 1, got 2"),
])
def test_bad_launch_parameters(launch, exc, match):
    with pytest.raises(exc, match=match):
        delta_attention(*qkv(), **RULE, **launch)


@pytest.mark.parametrize("head_dim, device, hopper", [(128, "cuda", False), (256, "cuda", False), (64, "cpu", False),
                                                     (128, "cuda", True)])
def test_launch_config_resolves_defaults(head_dim, device, hopper):
    """Fields given are kept; each zero takes the default of that head dim, device and kernel family."""
    base = HOPPER_DEFAULT if hopper else default_launch(head_dim, torch.device(device))
    cfg = LaunchConfig(block_m=32, dense_num_stages=5).resolved(head_dim, torch.device(device), hopper)
    assert cfg == dataclasses.replace(base, block_m=32, dense_num_stages=5)
    assert LaunchConfig().resolved(head_dim, torch.device(device), hopper) == base


def test_largest_rule_arguments_pass_validation():
    """2**31 - 1 is the bound, not past it: sink + window this wide makes any N exact."""
    gen = torch.Generator().manual_seed(45)
    q, k, v = (torch.randn(1, heads, 45, 64, generator=gen) for heads in (4, 2, 2))
    out = delta_attention(q, k, v, sink=2**31 - 1, window=2**31 - 1, gamma=2**31 - 1, correction="tail")
    truth = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                             enable_gqa=True)
    assert (out.double() - truth).abs().max() < 2e-5


# ---- the registered ops check what the wrappers check --------------------------------------------------

def _bad_calls():
    """Inputs the Δ op refuses, as (q, k, v) makers: the issue's silent cases and each other limit."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    return {
        "int32": lambda: (t(1, 4, 32, 64, dtype=torch.int32), t(1, 2, 32, 64, dtype=torch.int32),
                          t(1, 2, 32, 64, dtype=torch.int32)),
        "float64": lambda: qkv(dtype=torch.float64),
        "mixed dtypes": lambda: (t(1, 4, 32, 64), t(1, 2, 32, 64, dtype=torch.float16), t(1, 2, 32, 64)),
        "head dim 32": lambda: qkv(d=32),
        "kv batch 1 for q batch 2": lambda: (t(2, 4, 32, 64), t(1, 2, 32, 64), t(1, 2, 32, 64)),
        "Hq=3 with Hkv=2": lambda: qkv(hq=3, hkv=2),
        "k and v shapes differ": lambda: (t(1, 4, 32, 64), t(1, 2, 32, 64), t(1, 2, 31, 64)),
        "3-D q": lambda: (t(4, 32, 64), t(1, 2, 32, 64), t(1, 2, 32, 64)),
        "q longer than k": lambda: (t(1, 4, 33, 64), t(1, 2, 32, 64), t(1, 2, 32, 64)),
    }


BAD_CALLS = list(_bad_calls())
MASKED_RULE = (4, 8, 8, "delta", None)


def _wrapper_error(q, k, v) -> str:
    with pytest.raises(ValueError) as raised:
        delta_attention(q, k, v, **RULE)
    return str(raised.value)


def _op_calls(q, k, v):
    """Each registered op that takes q, k, v, called directly as a compiled graph calls it."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril()
    causal = torch.ones((), dtype=torch.bool)
    return {
        "delta_attention": lambda: torch.ops.deltapass.delta_attention(q, k, v, 4, 8, 8, "delta", None),
        "delta_attention_masked": lambda: torch.ops.deltapass.delta_attention_masked(
            q, k, v, mask, "keep", causal, *MASKED_RULE),
        "site_slot": lambda: torch.ops.deltapass.site_slot(q, k, v, 0, 0, None),
    }


@pytest.mark.parametrize("case", BAD_CALLS)
def test_registered_ops_raise_the_wrappers_error(case):
    """torch.ops.deltapass.* run the wrapper's checks (kernels/limits.py): the same error, nothing computed.
    The session runs Triton's interpreter (conftest), where Hq=3/Hkv=2 and a batch-1 k/v once returned tensors."""
    q, k, v = _bad_calls()[case]()
    expected = _wrapper_error(q, k, v)
    for name, call in _op_calls(q, k, v).items():
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == expected, name


@pytest.mark.parametrize("case", BAD_CALLS)
def test_fake_impls_raise_the_wrappers_error(case):
    """The fake impls check the same, so tracing (torch.compile, export) fails with the wrapper's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _bad_calls()[case]()
    expected = _wrapper_error(q, k, v)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fakes = tuple(mode.from_tensor(t) for t in (q, k, v))
        for name, call in _op_calls(*fakes).items():
            with pytest.raises(ValueError) as raised:
                call()
            assert str(raised.value) == expected, name


def test_a_compiled_graph_fails_at_trace_time_with_the_wrappers_message():
    q, k, v = _bad_calls()["Hq=3 with Hkv=2"]()
    expected = _wrapper_error(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: torch.ops.deltapass.delta_attention(q, k, v, 4, 8, 8, "delta", None),
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception) as raised:
        compiled(q, k, v)
    assert expected in str(raised.value)


def test_registered_ops_check_rule_launch_and_mask_arguments():
    q, k, v = qkv()
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    causal = torch.ones((), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"gamma must be >= 1, got gamma=0"):
        torch.ops.deltapass.delta_attention(q, k, v, 4, 8, 0, "delta", None)
    with pytest.raises(ValueError, match=r"launch parameter block_m must be a power of two .* got 48"):
        torch.ops.deltapass.delta_attention(q, k, v, 4, 8, 8, "delta", None, block_m=48)
    with pytest.raises(ValueError, match=r"scale must be a positive finite float .* scale=-1.0"):
        torch.ops.deltapass.delta_attention(q, k, v, 4, 8, 8, "delta", -1.0)
    with pytest.raises(ValueError, match=r"a 'keep' mask must be torch.bool"):
        torch.ops.deltapass.delta_attention_masked(q, k, v, mask.float(), "keep", causal, *MASKED_RULE)
    with pytest.raises(ValueError, match=r"mask_kind must be one of .* got mask_kind='bias'"):
        torch.ops.deltapass.exact_attention_masked(q, k, v, mask, "bias", causal, None)
    with pytest.raises(ValueError, match=r"mask_kind must be one of .* got mask_kind='bias'"):
        torch.ops.deltapass.mask_is_causal(mask, "bias")


def test_registered_op_checks_on_the_cpu_path_without_the_interpreter():
    """Without TRITON_INTERPRET the CPU path is the float32 reference, where int32 inputs came back truncated
    and float64, mixed dtypes, head dim 32 and a k/v batch unlike q's were all computed."""
    code = """
import json, torch
from deltapass.kernels.op import _interpreting
from tests.test_validation import _bad_calls, _op_calls
assert not _interpreting()
found = {}
for case, make in _bad_calls().items():
    for name, call in _op_calls(*make()).items():
        try:
            out = call()
            found[f"{case}/{name}"] = f"returned {out.dtype} {tuple(out.shape)}"
        except ValueError as exc:
            found[f"{case}/{name}"] = str(exc)
print(json.dumps(found))
"""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for case, make in _bad_calls().items():
        expected = _wrapper_error(*make())
        for name in ("delta_attention", "delta_attention_masked", "site_slot"):
            assert found[f"{case}/{name}"] == expected
