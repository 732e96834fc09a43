"""Hand-written attention, one module per pattern family: found, judged, and equal to the per-layer truth."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltapass
from deltapass import DeltaConfig, SiteConfig
from deltapass.kernels import delta_attention

SMALL = SiteConfig(sink=4, window=32, gamma=16)
N, DIM, HQ, HKV, D = 200, 96, 4, 2, 64


class Attention(nn.Module):
    """q/k/v projections shared by every pattern; `scores_to_output` is the pattern under test."""

    def __init__(self, pattern: str, truth: bool = False):
        super().__init__()
        self.q = nn.Linear(DIM, HQ * D)
        self.k = nn.Linear(DIM, HKV * D)
        self.v = nn.Linear(DIM, HKV * D)
        self.o = nn.Linear(HQ * D, DIM)
        self.pattern, self.truth = pattern, truth
        self.register_buffer("tril", torch.ones(N, N, dtype=torch.bool).tril(), persistent=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, HQ, D).transpose(1, 2)
        k = self.k(x).view(b, n, HKV, D).transpose(1, 2)
        v = self.v(x).view(b, n, HKV, D).transpose(1, 2)
        if self.truth:
            out = delta_attention(q, k, v, **SMALL.op_arguments())
        else:
            out = getattr(self, self.pattern)(q, k, v, n, mask)
        return self.o(out.transpose(1, 2).reshape(b, n, HQ * D))

    @staticmethod
    def repeat_kv(t):
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, HQ // HKV, n, d).reshape(b, HQ, n, d)

    def mul_scale_masked_fill(self, q, k, v, n, mask):
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(D))
        blocked = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(blocked, float("-inf"))
        return torch.matmul(F.softmax(scores, dim=-1), v)

    def div_scale_additive_upcast(self, q, k, v, n, mask):
        k, v = k.repeat_interleave(HQ // HKV, dim=1), v.repeat_interleave(HQ // HKV, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        additive = torch.full((n, n), float("-inf"), device=q.device).triu(1)
        probs = torch.softmax(scores + additive, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.drop(probs) @ v                       # dropout module: identity in eval

    def folded_scale_where_buffer(self, q, k, v, n, mask):
        q = q * D ** -0.5                                 # the scale folded into q
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        scores = torch.where(self.tril[:n, :n], q @ k.permute(0, 1, 3, 2), torch.finfo(q.dtype).min)
        return F.dropout(scores.softmax(-1), p=0.0, training=self.training) @ v

    def bmm_input_mask(self, q, k, v, n, mask):
        b = q.shape[0]
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        q3, k3, v3 = (t.reshape(b * HQ, n, D) for t in (q, k, v))
        scores = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(D)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.bmm(scores.softmax(dim=-1), v3).view(b, HQ, n, D)

    def baddbmm_additive(self, q, k, v, n, mask):
        b = q.shape[0]
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        q3, k3, v3 = (t.reshape(b * HQ, n, D) for t in (q, k, v))
        additive = torch.full((n, n), float("-inf"), device=q.device).triu(1).expand(b * HQ, n, n)
        scores = torch.baddbmm(additive, q3, k3.transpose(1, 2), alpha=1.0 / math.sqrt(D))
        return torch.bmm(torch.softmax(scores.float(), dim=-1).type_as(v3), v3).view(b, HQ, n, D)

    def bidirectional(self, q, k, v, n, mask):
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v

    def sliding_window(self, q, k, v, n, mask):
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() & \
            torch.ones(n, n, dtype=torch.bool, device=q.device).triu(-16)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v

    def bias_not_mask(self, q, k, v, n, mask):
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        blocked = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(blocked, -5.0)
        return scores.softmax(-1) @ v


def run(pattern, x, mask=None, config=DeltaConfig(default=SMALL)):
    torch.manual_seed(0)
    model = Attention(pattern).eval()
    truth = Attention(pattern, truth=True).eval()
    truth.load_state_dict(model.state_dict())
    args = (x,) if mask is None else (x, mask)
    with torch.no_grad():
        report = deltapass.explain(model, *args, config=config)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=deltapass.backend(config))(*args)
        return report, out, model(*args), truth(x)


PROVEN = ["mul_scale_masked_fill", "div_scale_additive_upcast", "baddbmm_additive"]
CHECKED_PER_CALL = ["folded_scale_where_buffer", "bmm_input_mask"]


@pytest.mark.parametrize("pattern", PROVEN + CHECKED_PER_CALL)
def test_causal_pattern_is_replaced_and_equals_per_layer_delta(pattern):
    x = torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(N, N, dtype=torch.bool).tril().expand(2 * HQ, N, N) if pattern == "bmm_input_mask" else None
    report, out, exact, truth = run(pattern, x, mask)
    assert len(report.sites) == 1 and report.sites[0].replaced, str(report)
    assert report.sites[0].mask_checked_per_call == (pattern in CHECKED_PER_CALL), str(report)
    assert (out - exact).abs().max() > 1e-2                       # the Δ approximation really ran
    torch.testing.assert_close(out, truth, atol=2e-4, rtol=2e-4)


def test_input_mask_that_is_not_causal_runs_exact():
    x = torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(N, N, dtype=torch.bool).tril()
    keep[:, :3] = True                                             # three global tokens: not causal
    report, out, exact, _ = run("bmm_input_mask", x, keep.expand(2 * HQ, N, N))
    assert report.sites[0].replaced
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern,reason", [
    ("bidirectional", "no mask"),
    ("sliding_window", "mask is not causal"),
    ("bias_not_mask", "not -inf"),
])
def test_non_causal_patterns_stay_exact_with_a_reason(pattern, reason):
    x = torch.randn(1, N, DIM, generator=torch.Generator().manual_seed(3))
    report, out, exact, _ = run(pattern, x)
    assert len(report.sites) == 1 and not report.sites[0].replaced, str(report)
    assert reason in report.sites[0].reason, str(report)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


def test_training_dropout_in_a_pattern_stays_exact():
    model = Attention("div_scale_additive_upcast").train()
    with torch.no_grad():
        report = deltapass.explain(model, torch.randn(1, N, DIM), config=DeltaConfig(default=SMALL))
    assert not report.sites[0].replaced and "dropout_p=0.1" in report.sites[0].reason, str(report)
