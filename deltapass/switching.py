"""Run-time site slots: one compiled graph that runs any config, for the tuner's search.

A graph compiled for one config carries its rule as constants, so every config costs a full
Inductor lowering (tens of seconds for a 30-layer model). For the search the backend instead
rewrites each proven-causal site into `deltapass::site_slot(q, k, v, board, site, scale)`: at run
time the op reads the site's decision from a Switchboard and runs exactly what the rewritten
graph of that decision runs there (the Δ op with its rule, or SDPA is_causal). The graph is
lowered once; switching configs is setting the board's decisions.

CUDA graphs record the launches of one config, so under CUDA graphs every config gets its own
recording (GraphedCall), made when the config first runs; a switch never replays another
config's launches.

The chosen config is then compiled the ordinary way (constants in the graph) to confirm its
speed: a slot runs a dense site's SDPA eagerly (Inductor picks its own SDPA kernel in the ordinary
graph) and adds one contiguous copy, so slot timings rank configs but are not exactly what users run.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from deltapass.kernels.limits import check_inputs
from deltapass.kernels.op import in_output_layout, output_like

from .decision import SiteDecision
from .sites import Site

# The op can carry only ints, strings and tensors, so a graph names its board by number. Boards are
# held weakly: a board lives exactly as long as the compiled graph that owns it.
_BOARDS: "weakref.WeakValueDictionary[int, Switchboard]" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count(1)


class Switchboard:
    """The decisions a slotted graph runs now, one per site in graph order."""

    def __init__(self, decisions: list[SiteDecision]) -> None:
        self.decisions = list(decisions)
        self.number = next(_NUMBERS)
        _BOARDS[self.number] = self

    def set(self, decisions: list[SiteDecision]) -> None:
        if len(decisions) != len(self.decisions):
            raise ValueError(f"the board has {len(self.decisions)} sites, got {len(decisions)} decisions")
        self.decisions = list(decisions)


def can_slot(sites: list[Site]) -> bool:
    """True when every replaceable site is proven causal self-attention (no per-call mask check, no chunk over a
    KV cache, whose exact form is not SDPA is_causal), so a slot can run it."""
    return any(s.replaceable for s in sites) and all(s.runtime_mask is None and not s.chunk
                                                     for s in sites if s.replaceable)


@torch.library.custom_op("deltapass::site_slot", mutates_args=())
def site_slot(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, board: int, site: int,
              scale: float | None) -> torch.Tensor:
    """Attention at `site` as board `board` decides now: the Δ op or SDPA is_causal (GQA), in the Δ op's
    output layout (kernels.op.output_like) either way. Any decision may be the Δ op, so a slot takes only
    inputs the Δ op takes (the pass slots only such sites), and says so at trace time too."""
    check_inputs(q, k, v, scale)
    found = _BOARDS.get(board)
    if found is None:
        raise RuntimeError(f"site slot board {board} no longer exists (its compiled graph was freed)")
    decision = found.decisions[site]
    if decision.uses_delta:
        c = decision.config
        return torch.ops.deltapass.delta_attention.default(q, k, v, c.sink, c.window, c.gamma, c.correction, scale,
                                                           **dict(c.launch))
    if decision.action != "exact_causal":
        raise RuntimeError(f"site slot {site} cannot run action {decision.action!r}")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return in_output_layout(out, q)


@site_slot.register_fake
def _(q, k, v, board, site, scale):
    check_inputs(q, k, v, scale)
    return output_like(q)


class GraphedCall:
    """One CUDA-graph recording of `fn` on arguments shaped like `args`; calls copy fresh inputs in and replay.

    Parameters and buffers (static addresses, as Dynamo marks them) are recorded in place; every other
    tensor input gets a static copy. As with torch.compile's CUDA graphs, the outputs live in the
    recording's memory and are overwritten by the next replay.
    """

    def __init__(self, fn, args: tuple) -> None:
        self.static = tuple(a.clone() if isinstance(a, torch.Tensor) and not _static_address(a) else a
                            for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):      # warm-up: Triton compiles and autotunes outside the capture
            fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.static)

    def __call__(self, *args):
        for fresh, kept in zip(args, self.static, strict=True):
            if isinstance(fresh, torch.Tensor) and fresh.data_ptr() != kept.data_ptr():
                kept.copy_(fresh)
        self.graph.replay()
        return type(self.outputs)(self.outputs) if isinstance(self.outputs, (list, tuple)) else self.outputs


def _static_address(t: torch.Tensor) -> bool:
    """Parameters and the buffers Dynamo marks as static: their addresses hold across calls."""
    if isinstance(t, torch.nn.Parameter):
        return True
    try:
        from torch._dynamo.utils import get_static_address_type
    except ImportError:      # an older torch: only parameters count, buffers get copied per call
        return False
    return get_static_address_type(t) is not None
