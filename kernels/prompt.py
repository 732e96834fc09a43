"""The prompt's full length during a chunked prefill: the one run-time input of the Δ ops besides their tensors.

A compiled model's graph cannot carry the length of the prompt a chunk belongs to: the same graph runs
every chunk, and the prompt goes on past the chunk's last key. The Δ ops read it instead, at call time,
from a context variable set around the chunked prefill (deltapass.prefill does this):

    with deltapass.kernels.prompt_length(len(prompt)):
        for chunk in chunks:
            model(chunk, cache=cache)

A Δ call whose prompt_length argument is None takes the value set here, else N_k (the chunk ends the
prompt). The registered ops' Python impls run at every call, also inside Inductor's code, so each chunk
reads the value in force when it runs. A CUDA-graph recording would replay the value of the chunk it
recorded, so reading one during a capture is an error.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch

from .limits import MAX_PROMPT_LENGTH

_PROMPT_LENGTH: ContextVar[int | None] = ContextVar("deltapass_prompt_length", default=None)


@contextlib.contextmanager
def prompt_length(n: int) -> Iterator[int]:
    """Inside the block, Δ calls without a prompt_length argument treat their queries as a chunk of an
    n-token prompt (kernels/rule.py): an earlier chunk's last rows stay sparse rows, not the prompt's tail."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"prompt_length must be an int, got prompt_length={n!r} ({type(n).__name__})")
    if not 1 <= n <= MAX_PROMPT_LENGTH:
        raise ValueError(f"prompt_length must be in 1..2**31 - 1, got prompt_length={n}")
    token = _PROMPT_LENGTH.set(n)
    try:
        yield n
    finally:
        _PROMPT_LENGTH.reset(token)


def current_prompt_length() -> int | None:
    """The prompt length set by the innermost prompt_length() block, or None outside any."""
    return _PROMPT_LENGTH.get()


def prompt_length_for_call(given: int | None) -> int | None:
    """The prompt length a Δ call runs with: its argument, else the prompt_length() block's (None: N_k)."""
    if given is not None:
        return given
    found = _PROMPT_LENGTH.get()
    if found is not None and _capturing():
        raise RuntimeError(
            f"a Δ op read prompt_length={found} from deltapass.kernels.prompt_length() during a CUDA-graph "
            "capture: the recording would replay this chunk's prompt length for every chunk. Run a chunked "
            "prefill without CUDA graphs (torch.compile's default mode, not mode='reduce-overhead')")
    return found


def _capturing() -> bool:
    """Whether the current CUDA stream is recording a CUDA graph."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:       # a torch built without CUDA has nothing to capture
        return False
