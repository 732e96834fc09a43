"""Reading JSON that users or other processes wrote (configs, cache entries): bounded, strict, never a hang.

Python's json recurses once per nesting level (`'[' * 100000` is a RecursionError), turns any
integer literal into an int (5000 digits are a ValueError about sys.set_int_max_str_digits), and keeps
the last of duplicate keys silently. `parse_json` bounds size, depth and integer length, makes a
duplicate key an error, and names what it parsed in every error. `read_text_file` reads a bounded
amount, and with `regular_only` refuses FIFOs and devices without blocking on them.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

# A config or a cache entry is a few KB; a model with a thousand per-layer overrides stays well below.
MAX_JSON_BYTES = 16 << 20
# Configs and entries nest four or five levels (entry > config > layers > "3" > launch).
MAX_JSON_DEPTH = 64
# Every number the package reads fits in int64; 100 digits still lets validation name a too-large value.
MAX_INT_DIGITS = 100

# A JSON string (its closing quote optional, so an unterminated one ends the scan instead of being rescanned
# from each later quote) or a bracket: one linear pass finds the nesting depth outside strings.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)


class JSONLimitError(ValueError):
    """Well-formed JSON text beyond a limit: too long, too deep, a duplicate key, a too-long integer."""


class NotARegularFile(OSError):
    """read_text_file(regular_only=True) met a FIFO, a directory, a device or a socket."""


def parse_json(text: str, what: str) -> Any:
    """json.loads within the limits above; `what` ("config", "cache entry x.json") names the text in errors.

    Raises JSONLimitError for a broken limit or a duplicate key, and json.JSONDecodeError (a ValueError) for
    text that is not JSON: each caller says in its own words what the text was meant to be.
    """
    if len(text) > MAX_JSON_BYTES:
        raise JSONLimitError(f"{what} is {len(text)} characters long; JSON here is limited to {MAX_JSON_BYTES}")
    depth = 0
    for token in _TOKEN.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise JSONLimitError(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels "
                                     f"(at character {token.start()})")
        elif bracket in "]}":
            depth -= 1
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_int=_bounded_int)
    except JSONLimitError as exc:
        raise JSONLimitError(f"{what}: {exc}") from None


def read_text_file(path: str | os.PathLike, *, regular_only: bool = False) -> str:
    """A file's UTF-8 text, at most MAX_JSON_BYTES (else JSONLimitError; the caller names the file).

    regular_only: refuse anything but a regular file (NotARegularFile) without opening or waiting on it. A FIFO
    in a cache folder would block a plain open() until some writer came: stat() says what the path is
    before it is opened, and fstat() of the non-blocking descriptor checks the object actually opened
    (the path may have been replaced in between). Without regular_only, a pipe a user names on purpose
    (`--config <(...)`) is read.
    """
    flags = os.O_RDONLY
    if regular_only:
        _refuse_non_regular(os.stat(path).st_mode)
        flags |= getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if regular_only:
            _refuse_non_regular(os.fstat(fd).st_mode)
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise JSONLimitError(f"larger than {MAX_JSON_BYTES} bytes, the limit for JSON here")
    return data.decode("utf-8")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JSONLimitError(f"duplicate key {key!r} in one JSON object (each key may appear once)")
        obj[key] = value
    return obj


def _bounded_int(digits: str) -> int:
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        raise JSONLimitError(f"a JSON integer of {count} digits; integers here have at most {MAX_INT_DIGITS}")
    return int(digits)


def _refuse_non_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "another kind of file")
    raise NotARegularFile(f"not a regular file ({kind})")
