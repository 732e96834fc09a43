"""Model loading: context extension by YaRN on a tiny random Llama saved as a Hugging Face folder."""
from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deltapass.search.models import LoadedModel, extend_context, load_model, yarn_factor  # noqa: E402

NATIVE = 256


def save_tiny_llama(folder, **config_extra) -> None:
    """A 2-layer random Llama (head_dim 32, GQA 3:1) and a word-level tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=NATIVE)
    config = LlamaConfig(vocab_size=len(words), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=NATIVE, rope_theta=10_000.0, **config_extra)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder)
    return folder


def rotary(loaded: LoadedModel):
    return loaded.model.model.rotary_emb


def test_native_load_keeps_rope(tiny):
    loaded = load_model(tiny)
    assert loaded.rope == {"rope_theta": 10_000.0, "rope_type": "default", "max_position_embeddings": NATIVE,
                           "extended": False}
    assert rotary(loaded).attention_scaling == 1.0
    assert load_model(tiny, context=NATIVE).rope == loaded.rope          # fits natively: nothing changes
    assert not hasattr(loaded, "max_length")


@pytest.mark.parametrize("context, factor", [(2 * NATIVE, 2.0), (3 * NATIVE, 4.0), (4 * NATIVE, 4.0)])
def test_context_applies_yarn(tiny, context, factor):
    native = load_model(tiny)
    loaded = load_model(tiny, context=context)
    cfg = loaded.model.config
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == factor
    assert cfg.rope_parameters["original_max_position_embeddings"] == NATIVE
    assert cfg.max_position_embeddings == NATIVE * factor >= context
    assert loaded.rope["extended"] and loaded.rope["factor"] == factor
    assert loaded.rope["max_position_embeddings"] == NATIVE * factor
    json.dumps(loaded.rope)                                              # reports can carry it
    # The rotary embedding the model really runs is YaRN's: low frequencies interpolated by the
    # factor, the highest ones kept, cos/sin scaled by 0.1 ln(factor) + 1.
    inv, inv0 = rotary(loaded).inv_freq, rotary(native).inv_freq
    assert torch.allclose(inv[0], inv0[0]) and torch.allclose(inv[-1], inv0[-1] / factor)
    assert rotary(loaded).attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(factor)).item() + 1)
    # and the outputs differ from native RoPE, already within the native length
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        assert not torch.allclose(loaded.model(ids).logits, native.model(ids).logits, atol=1e-4)
    assert loaded.tokenizer.model_max_length >= context


def test_explicit_rope_scale(tiny):
    loaded = load_model(tiny, rope_scale=3)
    assert loaded.rope["factor"] == 3.0 and loaded.model.config.max_position_embeddings == 3 * NATIVE
    assert load_model(tiny, rope_scale=1).rope["rope_type"] == "default"
    with pytest.raises(ValueError, match=r"rope_scale=2 .* context=1000"):
        load_model(tiny, context=1000, rope_scale=2)


def test_model_with_its_own_scaling_keeps_it(tmp_path, caplog):
    save_tiny_llama(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with caplog.at_level(logging.WARNING, logger="deltapass.search.models"):
        loaded = load_model(tmp_path, context=8 * NATIVE)
    assert loaded.rope["rope_type"] == "linear" and loaded.rope["factor"] == 2.0 and not loaded.rope["extended"]
    assert "context=2048" in caplog.text
    assert load_model(tmp_path, rope_scale=2.0).rope["rope_type"] == "linear"       # the same factor: fine
    with pytest.raises(ValueError, match=r"rope_scale=4 conflicts"):
        load_model(tmp_path, rope_scale=4)


def test_yarn_factor_and_bad_arguments():
    assert [yarn_factor(n, 8192) for n in (4096, 8192, 8193, 16384, 20000, 32768, 65536)] == [
        1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0]
    from transformers import LlamaConfig

    for kwargs, name in ((dict(context=0), "context=0"), (dict(context=1.5), "context=1.5"),
                         (dict(context=True), "context=True"), (dict(rope_scale=0.5), "rope_scale=0.5"),
                         (dict(rope_scale="4"), "rope_scale='4'")):
        with pytest.raises(ValueError, match=name):
            extend_context(LlamaConfig(max_position_embeddings=NATIVE), **kwargs)
