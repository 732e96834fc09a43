"""The table of attention forms: every entry reads some model, and a new form is one more entry."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_patterns import DIM, N, Attention

from deltapass.patterns import Reading
from deltapass.sites import PATTERNS, find_sites, first_match


def dynamo_graph(model: nn.Module, *args) -> torch.fx.Graph:
    """The one graph Dynamo hands a backend for model(*args)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*args)
    return graphs[0]


class SoftCapped(nn.Module):
    """Gemma-2 style: tanh soft-capping between q kᵀ and the softmax."""

    def forward(self, q, k, v):
        scores = 30.0 * torch.tanh(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) / 30.0)
        return torch.softmax(scores, dim=-1) @ v


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def random_qkv(n_q=N, n_k=N, heads=3, head_dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n_q, head_dim, generator=gen), torch.randn(1, heads, n_k, head_dim, generator=gen),
            torch.randn(1, heads, n_k, head_dim, generator=gen))


def entries_matched(graph: torch.fx.Graph) -> list[str]:
    return [match[0].name for match in map(first_match, graph.nodes) if match]


HAND_WRITTEN = {"mul_scale_masked_fill": "matmul-softmax-matmul", "div_scale_additive_upcast": "matmul-softmax-matmul",
                "folded_scale_where_buffer": "matmul-softmax-matmul", "bmm_input_mask": "matmul-softmax-matmul",
                "baddbmm_additive": "baddbmm-softmax-bmm", "bidirectional": "matmul-softmax-matmul",
                "sliding_window": "matmul-softmax-matmul", "bias_not_mask": "matmul-softmax-matmul"}


def test_every_table_entry_reads_a_model_and_each_model_its_own_entry():
    matched = {}
    x = torch.randn(2, N, DIM)
    for pattern in HAND_WRITTEN:
        mask = torch.ones(N, N, dtype=torch.bool).tril().expand(8, N, N) if pattern == "bmm_input_mask" else None
        args = (x,) if mask is None else (x, mask)
        matched[pattern] = entries_matched(dynamo_graph(Attention(pattern).eval(), *args))
    matched["soft-capped"] = entries_matched(dynamo_graph(SoftCapped(), *random_qkv()))
    matched["sdpa"] = entries_matched(dynamo_graph(Sdpa(), *random_qkv()))
    expected = {**{p: [e] for p, e in HAND_WRITTEN.items()}, "soft-capped": ["unmodelled-scores"], "sdpa": ["sdpa"]}
    assert matched == expected
    assert {name for names in expected.values() for name in names} == {p.name for p in PATTERNS}


def test_an_entry_left_out_of_the_table_is_not_read():
    graph = dynamo_graph(Attention("baddbmm_additive").eval(), torch.randn(1, N, DIM))
    [site] = find_sites(graph)
    assert site.replaceable, site.reason
    without = tuple(p for p in PATTERNS if p.name != "baddbmm-softmax-bmm")
    [site] = find_sites(graph, without)
    assert not site.replaceable and "scores pass through ops the pass does not model" in site.reason


def test_unnamed_sites_number_sdpa_first_then_hand_written():
    class Both(nn.Module):
        def forward(self, q, k, v):
            blocked = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
            hand = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(blocked, float("-inf")), -1) @ v
            return hand + F.scaled_dot_product_attention(q, k, v, is_causal=True)

    sites = find_sites(dynamo_graph(Both(), *random_qkv()))
    assert [(s.kind, s.name, s.replaceable) for s in sites] == [("matmul-softmax", "attention.1", True),
                                                                 ("sdpa", "attention.0", True)]


@torch.library.custom_op("deltapass_test::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@causal_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def _read_causal_attention(node: torch.fx.Node) -> Reading:
    q, k, v = node.args
    return Reading(node=node, query=q, key=k, value=v, scale=None, dropout=(0.0, True), is_causal=True)


# An attention op the pass has never heard of, judged by the SDPA entry's checks.
CUSTOM = dataclasses.replace(PATTERNS[0], name="custom-causal", kind="custom",
                             is_core=lambda node: node.target is torch.ops.deltapass_test.causal_attention.default,
                             read=_read_causal_attention)


@pytest.mark.parametrize("n_q,reason", [(N, ""), (48, f"query length 48 != key length {N}")])
def test_a_new_form_is_one_more_table_entry(n_q, reason):
    class Custom(nn.Module):
        def forward(self, q, k, v):
            return causal_attention(q, k, v) * 2.0

    graph = dynamo_graph(Custom(), *random_qkv(n_q=n_q, seed=n_q))
    assert find_sites(graph) == []
    [site] = find_sites(graph, PATTERNS + (CUSTOM,))
    core = next(n for n in graph.nodes if CUSTOM.is_core(n))
    assert (site.kind, site.node, site.replaceable) == ("custom", core, not reason) and reason in site.reason
    assert (site.query, site.key, site.value) == core.args
