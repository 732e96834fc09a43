"""Bad input gets an error that names the argument and the value."""
from __future__ import annotations

import pytest
import torch

from deltapass.kernels import LaunchConfig, delta_attention


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


@pytest.mark.parametrize("kwargs,match", [
    (dict(sink=4, window=8, gamma=0), r"gamma must be >= 1, got gamma=0"),
    (dict(sink=-1, window=8, gamma=8), r"sink must be >= 0, got sink=-1"),
    (dict(sink=4, window=-3, gamma=8), r"window must be >= 0, got window=-3"),
    (dict(sink=0, window=0, gamma=8), r"sink \+ window must be >= 1"),
    (dict(sink=4, window=8, gamma=8, correction="lse"), r"correction must be one of .* got correction='lse'"),
    (dict(sink=4, window=8, gamma=8, scale=-1.0), r"scale must be a positive finite float .* scale=-1.0"),
])
def test_bad_rule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        delta_attention(*qkv(), **kwargs)


def test_non_int_rule_argument():
    with pytest.raises(TypeError, match=r"gamma must be an int, got 8.0"):
        delta_attention(*qkv(), sink=4, window=8, gamma=8.0)


@pytest.mark.parametrize("launch,exc,match", [
    (dict(block_q=64), TypeError, r"unknown launch parameter\(s\) \['block_q'\]"),
    (dict(block_m=48), ValueError, r"block_m must be a power of two >= 16, got 48"),
    (dict(num_warps=3), ValueError, r"num_warps must be 1, 2, 4, 8 or 16, got 3"),
    (dict(dense_num_stages=9), ValueError, r"dense_num_stages must be in 1..8, got 9"),
    (dict(kv_tma=2), ValueError, r"kv_tma must be -1, 0 or 1, got 2"),
])
def test_bad_launch_parameters(launch, exc, match):
    with pytest.raises(exc, match=match):
        delta_attention(*qkv(), **RULE, **launch)


def test_launch_config_resolves_defaults():
    cfg = LaunchConfig(block_m=32).resolved(128, torch.device("cuda"))
    assert cfg.block_m == 32 and cfg.block_n > 0 and cfg.dense_num_warps > 0
