"""Task builder of the accuracy harness: RULER-style long-context probes with exact token lengths.

Three kinds of task, each built to exactly `length` prompt tokens so that accuracy can be compared
across attention variants at fixed context sizes:

* ``passkey``: the classic pass-key retrieval (Mohtashami & Jaggi, 2023): a five-digit key hidden
  in a repeated noise haystack.
* ``multikey``: RULER's multi-key needle-in-a-haystack: four "special magic numbers" for four
  keys hidden in real prose (King James Bible, shipped in ``data/kjv.txt.gz``); one is asked for.
* ``continuation``: a prose prefix whose next ``length // 8`` tokens are to be scored
  (teacher-forced log-likelihood), which catches degradation that retrieval alone misses.

Prompts are assembled from separately tokenized pieces (preamble, haystack slices, needles,
question) with ``tokenizer.encode(text, add_special_tokens=False)`` and concatenated as token ids:
that is the only way to hit an exact token count while keeping needle and question intact. No
special tokens are added (no BOS, no chat template): callers that want a BOS prepend it
themselves, and the prompt is then ``length + 1`` tokens. Every piece starts at a word boundary
(leading space or newline), so the concatenation is what joint tokenization of the text would give
for byte-level BPE tokenizers.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import logging
import random
import re
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

log = logging.getLogger("deltapass.search.tasks")

__all__ = ["KINDS", "KEYS", "Task", "answer_found", "build_tasks", "load_prose", "prose_ids"]

Kind = Literal["passkey", "multikey", "continuation"]
KINDS: tuple[str, ...] = ("passkey", "multikey", "continuation")

# --- prompt text -------------------------------------------------------------------------------
# The classic pass-key prompt, verbatim apart from the line breaks around the haystack.
PASSKEY_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. "
                    "Find it and memorize them. I will quiz you about the important information there.\n")
PASSKEY_NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {number}. Remember it. {number} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

# RULER's niah_multikey template (single query).
MULTIKEY_PREAMBLE = ("Some special magic numbers are hidden within the following text. "
                     "Make sure to memorize it. I will quiz you about the numbers afterwards.\n")
MULTIKEY_NEEDLE = " One of the special magic numbers for {key} is: {number}."
MULTIKEY_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                     "The special magic number for {key} mentioned in the provided text is")
N_KEYS = 4

# 100 keys; no adjective and no noun is used twice, so distractor keys never share a word with
# the asked one (a shared word would turn the task into a harder, different one).
KEYS: tuple[str, ...] = (
    "amber-falcon", "brisk-harbor", "copper-lantern", "dusty-violin", "eager-otter",
    "frosty-meadow", "gentle-anchor", "hollow-canyon", "ivory-compass", "jolly-pumpkin",
    "lunar-kettle", "misty-orchard", "noble-walrus", "olive-teapot", "proud-glacier",
    "quiet-saddle", "rusty-beacon", "silver-thimble", "tidy-pelican", "urban-cactus",
    "velvet-ladder", "windy-pebble", "young-badger", "zesty-lemon", "azure-trumpet",
    "bold-cricket", "crimson-kite", "dainty-walnut", "electric-moth", "fancy-spoon",
    "golden-barrel", "humble-castle", "icy-harp", "jade-tortoise", "keen-hammer",
    "lively-penguin", "marble-fountain", "narrow-bridge", "orange-whistle", "pale-mushroom",
    "quick-sparrow", "rapid-river", "scarlet-feather", "tall-chimney", "upper-valley",
    "vivid-parrot", "wooden-cart", "yellow-blanket", "zealous-ferret", "ancient-mirror",
    "bright-candle", "calm-lagoon", "dark-forest", "early-rooster", "fierce-tiger",
    "grassy-hill", "hidden-key", "iron-gate", "jagged-cliff", "kind-shepherd",
    "lonely-island", "mellow-cello", "nimble-squirrel", "odd-button", "plain-envelope",
    "royal-crown", "sandy-dune", "tiny-acorn", "uneven-stair", "vast-desert",
    "warm-scarf", "brave-knight", "clever-raven", "sturdy-wagon", "fuzzy-caterpillar",
    "glossy-beetle", "hasty-courier", "lucky-clover", "muddy-boot", "polished-helmet",
    "purple-plum", "rainy-window", "salty-pretzel", "shiny-coin", "smoky-kiln",
    "soft-pillow", "spicy-pepper", "stormy-ocean", "sunny-porch", "sweet-honey",
    "swift-arrow", "thin-needle", "twin-towers", "violet-orchid", "wild-stallion",
    "wise-owl", "woolly-mammoth", "broken-clock", "crooked-fence", "frozen-pond",
)

MIN_HAYSTACK = 64         # retrieval prompts need some haystack to be a search at all
MIN_CONTINUATION = 64     # prefix + scored part: at least 56 + 8 tokens
DEPTH_TOLERANCE = 64      # a needle seeks a sentence boundary within length/64 tokens of its target

# Boundary strength before a token: needles go in at the strongest boundary near their target.
NONE, WORD, CLAUSE, SENTENCE = 0, 1, 2, 3


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: Sequence[int], **kwargs: object) -> str: ...


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a bool
class Task:
    """One probe. ``input_ids`` is exactly ``length`` tokens, except for ``continuation``, where
    ``input_ids`` (the prefix) plus ``continuation_ids`` make ``length`` tokens."""

    kind: Kind
    length: int                    # target prompt length in tokens
    depth: float | None            # 0..1: fraction of the prompt before the (asked) needle
    input_ids: torch.Tensor        # 1-D long; the prefix for continuation
    answer: str                    # the digits to retrieve; "" for continuation
    continuation_ids: torch.Tensor | None  # the tokens to score after the prefix; continuation only
    seed: int                      # the `seed` given to build_tasks


# --- data --------------------------------------------------------------------------------------
@functools.cache
def load_prose() -> str:
    """The shipped King James prose (prose books, ~3.1 MB, ~757K SmolLM2 tokens; see data/README.md)."""
    data = importlib.resources.files("deltapass.search").joinpath("data/kjv.txt.gz").read_bytes()
    return gzip.decompress(data).decode("ascii")


@dataclass(frozen=True, eq=False)
class _Prose:
    ids: list[int]
    levels: list[int]              # boundary strength before each token, plus one for the end


# Encoding the prose takes seconds to tens of seconds, and a job asks for it more than once (calibration, then
# the tasks). Tokenizers hash by identity and the cache holds them, so an entry is never another's; a sweep
# uses one or two tokenizers, and 4 bound the memory.
@functools.lru_cache(maxsize=4)
def _prose(tokenizer: Tokenizer) -> _Prose:
    ids = _encode(tokenizer, load_prose())
    return _Prose(ids, _boundary_levels(tokenizer, ids))


def prose_ids(tokenizer: Tokenizer) -> torch.Tensor:
    """The whole shipped prose as one 1-D long tensor of token ids (cached per tokenizer)."""
    return torch.tensor(_prose(tokenizer).ids, dtype=torch.long)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _boundary_levels(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Strength of the boundary before each token (and after the last one), from decoded pieces."""
    uniq = sorted(set(ids))
    pieces = dict(zip(uniq, (tokenizer.decode([i]) for i in uniq)))

    def after(prev: str) -> int:  # the boundary a piece ends with
        tail = prev.rstrip()
        if tail.endswith((".", "?", "!")):
            return SENTENCE
        if tail.endswith((";", ":")):
            return CLAUSE
        return WORD if tail != prev else NONE

    levels = [SENTENCE]  # start of the text
    for prev, cur in zip(ids, ids[1:]):
        level = after(pieces[prev])
        if level == NONE and pieces[cur][:1].isspace():
            level = WORD
        levels.append(level)
    levels.append(max(after(pieces[ids[-1]]), WORD) if ids else SENTENCE)  # the end
    return levels


# --- placement ---------------------------------------------------------------------------------
def _task_rng(seed: int, kind: str, length: int, index: int) -> random.Random:
    # Hash rather than seed+offset: neighbouring seeds must not share streams, and str hashing
    # would depend on PYTHONHASHSEED.
    digest = hashlib.sha256(f"deltapass.tasks:{seed}:{kind}:{length}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _depths(samples: int) -> list[float]:
    if samples == 1:
        return [0.5]
    return [0.05 + 0.9 * i / (samples - 1) for i in range(samples)]


def _snap(levels: list[int], target: int, lo: int, hi: int, tolerance: int) -> int:
    """The index in [lo, hi] nearest to target at the strongest boundary level found within
    `tolerance`; failing that, the nearest word boundary at any distance (or target itself)."""
    target = min(max(target, lo), hi)
    for level in (SENTENCE, CLAUSE, WORD):
        for step in range(tolerance + 1):
            for j in (target - step, target + step):
                if lo <= j <= hi and levels[j] >= level:
                    return j
    for step in range(hi - lo + 1):
        for j in (target - step, target + step):
            if lo <= j <= hi and levels[j] >= WORD:
                return j
    return target


def _assemble(prefix: list[int], haystack: list[int], levels: list[int],
              needles: list[tuple[float, list[int]]], suffix: list[int], length: int) -> list[int]:
    """prefix + haystack with needles inserted + suffix, each needle at the boundary nearest to
    ``depth * length`` in prompt coordinates (so the depth is what a reader of the prompt sees)."""
    tolerance = max(8, length // DEPTH_TOLERANCE)
    out = list(prefix)
    cursor = 0            # haystack tokens consumed so far
    for depth, needle in sorted(needles, key=lambda dn: dn[0]):
        target = round(depth * length) - len(out) + cursor   # in haystack coordinates
        cut = _snap(levels, target, cursor, len(haystack), tolerance)
        out += haystack[cursor:cut] + needle
        cursor = cut
    out += haystack[cursor:] + suffix
    return out


def _pick_windows(rng: random.Random, prose: _Prose, width: int, count: int) -> list[int]:
    """`count` window starts of `width` tokens, each in its own stratum of the prose when it is
    long enough (so samples do not overlap), moved forward to a sentence start when one is near."""
    n = len(prose.ids)
    stratum = n // count
    if stratum < width:
        log.warning("the shipped prose (%d tokens) holds fewer than %d disjoint windows of %d tokens: "
                    "samples will share text", n, count, width)
    strata = list(range(count))
    rng.shuffle(strata)       # which sample reads which part of the text varies with the seed
    starts = []
    for k in strata:
        if stratum >= width:
            lo, hi = k * stratum, (k + 1) * stratum - width
        else:                  # too little text for disjoint windows: let them overlap
            lo, hi = 0, n - width
        start = rng.randint(lo, hi)
        nxt = next((j for j in range(start, hi + 1) if prose.levels[j] == SENTENCE), start)
        starts.append(nxt)
    return starts


# --- the three kinds ---------------------------------------------------------------------------
def _too_small(kind: str, length: int, need: int) -> ValueError:
    return ValueError(f"length={length} is too small for {kind!r} tasks: "
                      f"needs at least {need} tokens (needles + question + {MIN_HAYSTACK} of haystack)")


def _passkey(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random, seed: int) -> Task:
    number = str(rng.randint(10_000, 99_999))
    prefix = _encode(tokenizer, PASSKEY_PREAMBLE)
    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(number=number))
    suffix = _encode(tokenizer, PASSKEY_QUESTION)
    n_hay = length - len(prefix) - len(needle) - len(suffix)
    if n_hay < MIN_HAYSTACK:
        raise _too_small("passkey", length, length - n_hay + MIN_HAYSTACK)
    unit = _encode(tokenizer, PASSKEY_NOISE)   # starts with a space, ends with '.': repeats cleanly
    haystack = (unit * (n_hay // len(unit) + 1))[:n_hay]
    ids = _assemble(prefix, haystack, _boundary_levels(tokenizer, haystack),
                    [(depth, needle)], suffix, length)
    return Task("passkey", length, depth, torch.tensor(ids, dtype=torch.long), number, None, seed)


def _distractor_depths(rng: random.Random, depth: float, count: int) -> list[float]:
    """Random depths in [0.02, 0.98], apart from each other and from the asked one."""
    gap = 0.1
    while True:
        for _ in range(200):
            picks = [rng.uniform(0.02, 0.98) for _ in range(count)]
            taken = [depth] + picks
            if all(abs(a - b) >= gap for i, a in enumerate(taken) for b in taken[i + 1:]):
                return picks
        gap /= 2


def _multikey(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random,
              start: int, seed: int) -> Task:
    keys = rng.sample(KEYS, N_KEYS)                        # keys[0] is the one asked for
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), N_KEYS)]
    depths = [depth] + _distractor_depths(rng, depth, N_KEYS - 1)
    needles = [(d, _encode(tokenizer, MULTIKEY_NEEDLE.format(key=k, number=n)))
               for d, k, n in zip(depths, keys, numbers)]
    prefix = _encode(tokenizer, MULTIKEY_PREAMBLE)
    suffix = _encode(tokenizer, MULTIKEY_QUESTION.format(key=keys[0]))
    n_hay = length - len(prefix) - len(suffix) - sum(len(nd) for _, nd in needles)
    if n_hay < MIN_HAYSTACK:
        raise _too_small("multikey", length, length - n_hay + MIN_HAYSTACK)
    prose = _prose(tokenizer)
    start = min(start, len(prose.ids) - n_hay)             # the window was picked for `length`
    haystack = prose.ids[start:start + n_hay]
    levels = prose.levels[start:start + n_hay + 1]
    ids = _assemble(prefix, haystack, levels, needles, suffix, length)
    return Task("multikey", length, depth, torch.tensor(ids, dtype=torch.long), numbers[0], None, seed)


def _continuation(tokenizer: Tokenizer, length: int, start: int, seed: int) -> Task:
    ids = _prose(tokenizer).ids[start:start + length]
    n_scored = length // 8
    prefix, scored = ids[:length - n_scored], ids[length - n_scored:]
    return Task("continuation", length, None, torch.tensor(prefix, dtype=torch.long), "",
                torch.tensor(scored, dtype=torch.long), seed)


# --- public entry points -----------------------------------------------------------------------
def _check(lengths: Sequence[int], samples: int, kinds: Sequence[str]) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got samples={samples!r}")
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty sequence of {KINDS}, got kinds={kinds!r}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: unknown kind {kind!r}; expected one of {KINDS}")
    if not lengths:
        raise ValueError(f"lengths must be a non-empty sequence of ints, got lengths={lengths!r}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"lengths: every length must be an int >= 1, got length={length!r}")


def build_tasks(tokenizer: Tokenizer, *, lengths: Sequence[int] = (2048, 4096, 8192),
                samples: int = 8, kinds: Sequence[str] = KINDS, seed: int = 0) -> list[Task]:
    """`samples` tasks for every (kind, length), in that nesting order; the same arguments and
    tokenizer give identical tasks (no global RNG is touched).

    Retrieval needles sit at depths linspace(0.05, 0.95, samples); continuation windows and
    multikey haystacks come from distinct strata of the prose, at seed-dependent offsets.
    """
    _check(lengths, samples, kinds)
    tasks: list[Task] = []
    for kind in kinds:
        for length in lengths:
            if kind != "passkey":
                n_prose = len(_prose(tokenizer).ids)
                if kind == "continuation" and length < MIN_CONTINUATION:
                    raise ValueError(f"length={length} is too small for 'continuation' tasks: "
                                     f"needs at least {MIN_CONTINUATION} tokens")
                if length > n_prose:
                    raise ValueError(f"length={length} exceeds the shipped prose ({n_prose} tokens)")
                starts = _pick_windows(_task_rng(seed, kind, length, -1), _prose(tokenizer),
                                       length, samples)
            for i, depth in enumerate(_depths(samples)):
                rng = _task_rng(seed, kind, length, i)
                if kind == "passkey":
                    tasks.append(_passkey(tokenizer, length, depth, rng, seed))
                elif kind == "multikey":
                    tasks.append(_multikey(tokenizer, length, depth, rng, starts[i], seed))
                else:
                    tasks.append(_continuation(tokenizer, length, starts[i], seed))
    return tasks


_NUMBER = re.compile(r"\d+")


def answer_found(generated_text: str, task: Task) -> bool:
    """True when the first number in the generated text is the task's answer ("The pass key is
    12345." passes; "1234" or "no idea, 12345" fail: a later match is a guess, not retrieval)."""
    if not task.answer:
        raise ValueError(f"task.kind={task.kind!r} has no answer to find")
    first = _NUMBER.search(generated_text)
    return first is not None and first.group() == task.answer
