"""Calibration: mass outside sink + window from a dense forward, against a float64 truth."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deltapass.search.calibrate import (Calibration, calibrate, outside_mass, plot,  # noqa: E402
                                        rank_layers)
from deltapass.search.models import LoadedModel  # noqa: E402

CANDIDATES = ((3, 10), (0, 5), (8, 0), (2, 40), (100, 7))


def truth_outside(probs: torch.Tensor, candidates) -> torch.Tensor:
    """[C, Hkv] from full attention probabilities [B, Hkv, group, N, N] (float64), written out plainly."""
    n = probs.shape[-1]
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    out = []
    for s, w in candidates:
        dropped = (j <= t) & (j >= s) & (t - j >= w)
        out.append((probs * dropped).sum(-1).mean(dim=(0, 2, 3)))
    return torch.stack(out)


@pytest.mark.parametrize("max_scores", [2 * 6 * 77 * 3, 2 * 6 * 77 * 13, 1 << 26])   # 3, 13, all rows
def test_outside_mass_matches_float64_truth(max_scores):
    torch.manual_seed(1)
    b, hq, hkv, n, d = 2, 6, 2, 77, 16
    q, k = torch.randn(b, hq, n, d) * 2, torch.randn(b, hkv, n, d) * 2
    scale = 0.3
    scores = (q.double().reshape(b, hkv, 3, n, d) @ k.double().unsqueeze(2).transpose(-1, -2)) * scale
    probs = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    truth = truth_outside(probs, CANDIDATES)
    got = outside_mass(q, k, scale, CANDIDATES, max_scores=max_scores)
    assert got.shape == (len(CANDIDATES), hkv) and got.dtype == torch.float64
    torch.testing.assert_close(got, truth, atol=2e-6, rtol=1e-5)
    assert truth[1].min() > 0.2 and truth[4].max() < truth[0].min()     # the cases are not trivial


def tiny_llama(layers: int = 4) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         initializer_range=0.25)       # peaked, layer-dependent attention
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(model=model, tokenizer=None, name="tiny-llama", source="memory",
                       rope={"rope_type": "default"})


def test_calibrate_equals_eager_attention_probabilities():
    """The statistics come from the model's real post-RoPE queries and keys: eager attention's own
    probability matrices give the same numbers; the model's attention is restored afterwards."""
    loaded = tiny_llama()
    ids = torch.randint(0, 80, (203,), generator=torch.Generator().manual_seed(5))
    cal = calibrate(loaded, 190, CANDIDATES, ids=ids, max_scores=6 * 190 * 41)      # chunks of 41 rows
    assert loaded.model.config._attn_implementation == "sdpa"
    assert (cal.layers, cal.length, cal.candidates) == (4, 190, CANDIDATES)
    assert len(cal.outside_by_head[0][0]) == 2 and cal.rope == {"rope_type": "default"}

    loaded.model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = loaded.model(ids[None, :190], output_attentions=True).attentions
    for layer, probs in enumerate(attentions):
        truth = truth_outside(probs.double().reshape(1, 2, 3, 190, 190), CANDIDATES)
        for c in range(len(CANDIDATES)):
            assert cal.outside_by_head[c][layer] == pytest.approx(truth[c].tolist(), abs=1e-5)
            assert cal.outside[c][layer] == pytest.approx(truth[c].mean().item(), abs=1e-5)
    spread = cal.layer_outside(0, 5)
    assert max(spread) - min(spread) > 0.01          # layers differ: the ranking has something to rank


def test_rank_round_trip_and_plot(tmp_path):
    cal = Calibration(model="m", length=100, candidates=((4, 16), (8, 32)),
                      outside=((0.2, 0.5, 0.1, 0.5), (0.1, 0.3, 0.05, 0.4)),
                      outside_by_head=(((0.2,), (0.5,), (0.1,), (0.5,)), ((0.1,), (0.3,), (0.05,), (0.4,))),
                      rope={"rope_type": "yarn", "factor": 4.0}, text="t")
    assert rank_layers(cal, 4, 16) == [1, 3, 0, 2]            # ties: lower layer first
    assert rank_layers(cal, 8, 32) == [3, 1, 0, 2]
    with pytest.raises(ValueError, match="sink=4, window=32"):
        rank_layers(cal, 4, 32)
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Calibration.load(path) == cal
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    plot(cal, tmp_path / "cal.png")
    assert (tmp_path / "cal.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one entry per candidate"):
        Calibration(model="m", length=1, candidates=((4, 16),), outside=(), outside_by_head=())


@pytest.mark.parametrize("bad, name", [(((0, 0),), "(0, 0)"), ((), "candidates"), (((-1, 4),), "(-1, 4)")])
def test_bad_candidates_raise(bad, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
        outside_mass(torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8), 1.0, bad)
