"""Finding attention sites in a Dynamo FX graph and deciding, with a reason, which may take the Δ op.

A site is one attention computation. It is replaceable only when the pass can
prove it is causal self-attention at prefill: causal by construction
(is_causal=True with no mask, or a mask computed from shapes that evaluates to
the causal triangle), no dropout, and shapes and dtypes the kernels take. A mask
that comes from the model's inputs cannot be proven at compile time: such a site
takes the masked op, which checks the mask per call and runs exact attention
under it unless it is exactly causal.

A chunk of a prompt over a KV cache (chunked prefill) has fewer queries than keys,
N_q <= N_k, with the queries at the last N_q positions: it is replaceable when its
mask is bottom-right causal, proven at compile time or checked per call (with
dynamic shapes the mask is built from symbolic sizes, which are graph inputs, so it
is checked per call). is_causal=True with N_q != N_k is SDPA's top-left alignment,
not a chunk; decode (N_q = 1) stays exact. Anything else stays exact and says why.

The attention forms the pass knows are one table, PATTERNS: each entry names how to
recognise its core node, how to read the attention off it (deltapass.patterns) and the
checks it must pass, in order; the first check that objects gives the site's reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch
import torch.fx as fx

from deltapass.kernels import keeps_exactly_causal, unsupported_reason
from deltapass.kernels.masked import BLOCKED_BELOW

from .fingerprint import hint
from .patterns import (SDPA_TARGETS, Reading, example_value, is_sdpa, is_softmax, read_baddbmm_attention,
                       read_matmul_attention, read_sdpa, read_unmodelled_scores, ungrouped_kv)

__all__ = ["PATTERNS", "SDPA_TARGETS", "Pattern", "Site", "find_sites", "first_match", "layer_index", "site_name",
           "ungrouped_kv"]


@dataclass
class Site:
    """One attention site of a graph and the pass's verdict on it."""

    node: fx.Node
    name: str
    layer: int | None
    kind: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    scale: float | None
    replaceable: bool = False
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    # Set when the mask comes from the model's inputs: (mask kind, mask node), checked per call at run time.
    runtime_mask: tuple[str, fx.Node] | None = None
    # True when the queries may be fewer than the keys: a chunk of a prompt over a KV cache, its mask bottom-right
    # causal (proven or checked per call); the Δ op places its queries at the last N_q key positions.
    chunk: bool = False


@dataclass
class Candidate:
    """A site under judgement: what its pattern read, the site so far, and the graph it lives in."""

    site: Site
    reading: Reading
    graph: fx.Graph
    ancestors: Callable[[fx.Node], set]       # the nodes a node depends on (networkx, over the dataflow)


@dataclass(frozen=True)
class Pattern:
    """One attention form: its core node, how to read it, and what it must pass to take the Δ op.

    Each check returns "" or the reason the site stays exact; checks may add notes to the site
    or narrow its K/V (grouped-query expansions), and run in order until one objects.
    """

    name: str
    kind: str                                            # Site.kind
    is_core: Callable[[fx.Node], bool]
    read: Callable[[fx.Node], Reading | None]            # None: the core node is not this form after all
    checks: tuple[Callable[[Candidate], str], ...]


def site_name(node: fx.Node, ordinal: int) -> str:
    """Stable name: the innermost module path ("model.layers.7.self_attn"), else the site's ordinal."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"attention.{ordinal}"
    path = list(stack.values())[-1][0]
    path = re.sub(r"getattr\((.*?), '([^']+)'\)", r"\1.\2", path)
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])*\.?", "", path)      # Dynamo's local name for the root
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path or f"attention.{ordinal}"


def layer_index(name: str) -> int | None:
    """The last integer in the module path: "model.layers.7.self_attn" -> 7."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    return int(numbers[-1]) if numbers else None


def _known_equal(a, b) -> bool:
    """a == b for ints or SymInts, without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _known_at_most(a, b) -> bool:
    """a <= b for ints or SymInts, without adding a guard (a chunk's s0 <= s1 + s0 is known; s0 <= s1 is not)."""
    if isinstance(a, int) and isinstance(b, int):
        return a <= b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a <= b))


# ---- checks: each returns "" or why the site stays exact ----

def _ungroup_kv(c: Candidate) -> str:
    """Let the kernel read K/V per group: drop a repeat_kv / repeat_interleave expansion of both K and V."""
    if c.reading.gqa_in_op:
        return ""
    key, value = ungrouped_kv(c.reading.key), ungrouped_kv(c.reading.value)
    if key is not c.reading.key and value is not c.reading.value:
        c.site.key, c.site.value = key, value
        c.site.notes.append("grouped-query expansion of K/V removed; the kernel reads K/V per group")
    return ""


def _sdpa_mask(c: Candidate) -> str:
    """An SDPA mask given in place of is_causal must prove causality (or be checked per call)."""
    return "" if c.reading.mask is None else _causal_mask(c)


def _sdpa_dropout(c: Candidate) -> str:
    p = c.reading.dropout[0]
    if isinstance(p, fx.Node) or p != 0.0:
        return f"dropout_p={p} (training-time dropout is not Δ attention)"
    return ""


def _sdpa_other_mask(c: Candidate) -> str:
    if c.reading.other_mask is not None:
        return "explicit attention mask (not provably causal: padding, sliding window or custom mask)"
    return ""


def _sdpa_is_causal(c: Candidate) -> str:
    return "" if c.reading.is_causal is True else f"is_causal={c.reading.is_causal} (not causal attention)"


def _constant_scale(c: Candidate) -> str:
    return "" if isinstance(c.reading.scale, (float, int, type(None))) else "scale is computed at run time"


def _sdpa_shapes(c: Candidate) -> str:
    q, k, v = (example_value(n) for n in (c.reading.query, c.reading.key, c.reading.value))
    if q is None or k is None or v is None:
        return "query/key/value shapes unknown at compile time"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"not 4-D [batch, heads, seq, head_dim] (q {tuple(q.shape)})"
    return _tensor_blocker(q, k, v, tuple(q.shape), tuple(k.shape), tuple(v.shape), c.site.chunk)


def _softmax_over_keys(c: Candidate) -> str:
    softmax = c.reading.softmax
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    meta = example_value(softmax)
    rank = meta.dim() if meta is not None else 4
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return f"softmax over dim {dim}, not the key dim"
    return ""


def _eval_dropout(c: Candidate) -> str:
    """Dropout after the softmax is fine in eval (training=False) or with p=0."""
    if c.reading.dropout is not None:
        p, training = c.reading.dropout
        if training is not False and p != 0.0:
            return f"dropout_p={p} in training (training-time dropout is not Δ attention)"
    return ""


def _hand_written_shapes(c: Candidate) -> str:
    q, k, v = (example_value(n) for n in (c.reading.query, c.reading.key, c.reading.value))
    if q is None or k is None or v is None:
        return "query/key/value shapes unknown at compile time"
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        return (f"{q.dim()}-D attention (the pass rewrites [batch, heads, seq, head_dim] "
                "and [batch * heads, seq, head_dim] forms)")
    if q.dim() == 3:
        # bmm form: the leading dim folds batch and heads, so K/V must match Q there (no grouping to see).
        if not (_known_equal(q.shape[0], k.shape[0]) and _known_equal(k.shape[0], v.shape[0])):
            return f"3-D attention with q {tuple(q.shape)}, k {tuple(k.shape)}: leading dims differ"
        return _tensor_blocker(q, k, v, (1, *q.shape), (1, *k.shape), (1, *v.shape), c.site.chunk)
    return _tensor_blocker(q, k, v, tuple(q.shape), tuple(k.shape), tuple(v.shape), c.site.chunk)


def _unmodelled_scores(c: Candidate) -> str:
    return "scores pass through ops the pass does not model (e.g. logit soft-capping)"


def _tensor_blocker(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_shape: tuple, k_shape: tuple,
                    v_shape: tuple, chunk: bool) -> str:
    """Why q, k, v (seen as [batch, heads, seq, head_dim] shapes) cannot take the Δ op ("" if they can).

    Self-attention prefill is the pass's own condition: equal query and key lengths, or, for a chunk (a
    bottom-right causal mask), no more queries than keys. The op's input limits are the kernels' one
    definition (deltapass.kernels.unsupported_reason), read with sizes at their hints.
    """
    if _known_equal(q_shape[2], 1):
        return "decode step (query length 1)"
    if not _known_equal(q_shape[2], k_shape[2]):
        if not chunk:
            return (f"query length {q_shape[2]} != key length {k_shape[2]} with is_causal=True, which SDPA aligns "
                    "top-left: not a chunk over a KV cache (cross-attention, or a causal mask the model did not "
                    "build)")
        if not _known_at_most(q_shape[2], k_shape[2]):
            return f"query length {q_shape[2]} may exceed key length {k_shape[2]} (not a chunk over a KV cache)"
    shapes = [tuple(hint(d) for d in shape) for shape in (q_shape, k_shape, v_shape)]
    return unsupported_reason(*shapes, q.dtype, k.dtype, v.dtype, q.device.type, q.requires_grad)


def _causal_mask(c: Candidate) -> str:
    """'' when the mask provably keeps exactly the causal keys, or can be checked per call; else why not.

    A mask computed from shapes alone is evaluated here, once. A mask that depends on the
    model's inputs (a padding mask, say) is left to a run-time check: the site gets the
    masked Δ op, which falls back to exact attention under that mask when it is not causal.
    """
    if c.reading.mask is None:
        return "no mask (not causal attention)"
    kind, mask_node, *fill = c.reading.mask
    if kind == "two masks":
        return "scores get two masks or a scaled mask (baddbmm input and another mask)"
    if fill and not (isinstance(fill[0], (int, float)) and fill[0] <= BLOCKED_BELOW):
        return f"masked scores are set to {fill[0]!r}, not -inf (a bias, not a mask)"
    qm, km, mm = example_value(c.reading.query), example_value(c.reading.key), example_value(mask_node)
    if qm is None or km is None or mm is None or mm.dim() < 2:
        return "mask or query/key shapes unknown at compile time"
    n_q, n_k = qm.shape[-2], km.shape[-2]
    if not (_known_at_most(n_q, n_k) and _known_equal(mm.shape[-2], n_q) and _known_equal(mm.shape[-1], n_k)):
        return "mask shape does not match self-attention or a chunk of it ([..., N_q, N_k], N_q <= N_k)"
    if (kind == "additive") == (mm.dtype == torch.bool):
        return f"{kind} mask of dtype {mm.dtype}"
    c.site.chunk = not _known_equal(n_q, n_k)
    causal = "bottom-right causal (a chunk over a KV cache)" if c.site.chunk else "causal"
    # Symbolic sizes are placeholders too: a mask built from them (a chunk's, under dynamic shapes) is checked
    # per call like an input mask.
    placeholders = [a for a in c.ancestors(mask_node) | {mask_node} if a.op == "placeholder"]
    if placeholders:
        c.site.runtime_mask = (kind, mask_node)
        names = ", ".join(sorted(a.name for a in placeholders))[:80]
        source = ("is built from symbolic sizes" if all(isinstance(a.meta.get("example_value"), torch.SymInt)
                                                        for a in placeholders) else "comes from the inputs")
        c.site.notes.append(f"mask {source} ({names}): checked per call, Δ when exactly {causal}, exact attention "
                            "under the mask otherwise")
        return ""
    try:
        value = _evaluate(mask_node, c.graph, c.ancestors)
    except Exception as exc:
        return f"mask could not be evaluated at compile time ({type(exc).__name__})"
    if not bool(keeps_exactly_causal(value, kind)):
        return "mask is not causal (sliding window, bidirectional, bias or custom pattern)"
    c.site.notes.append(f"mask proven {causal} at compile time")
    return ""


def _evaluate(target: fx.Node, graph: fx.Graph, ancestors) -> torch.Tensor:
    """Run the constant subgraph that computes `target` (it has no placeholders among its ancestors)."""
    needed = ancestors(target) | {target}
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in needed:
            env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[target])
    owner = graph.owning_module
    module = fx.GraphModule(owner if owner is not None else torch.nn.Module(), sub)
    with torch.no_grad():
        return module()


# ---- the table ----

_HAND_WRITTEN_CHECKS = (_ungroup_kv, _softmax_over_keys, _eval_dropout, _causal_mask, _hand_written_shapes)

PATTERNS: tuple[Pattern, ...] = (
    # F.scaled_dot_product_attention / aten: is_causal=True, or a mask standing in for it.
    Pattern("sdpa", "sdpa", is_sdpa, read_sdpa,
            (_sdpa_mask, _sdpa_dropout, _sdpa_other_mask, _sdpa_is_causal, _constant_scale, _sdpa_shapes,
             _ungroup_kv)),
    # softmax([mask](matmul(q, kᵀ) [* scale])) @ v, 4-D matmul or 3-D bmm.
    Pattern("matmul-softmax-matmul", "matmul-softmax", is_softmax, read_matmul_attention, _HAND_WRITTEN_CHECKS),
    # softmax(baddbmm(mask, q, kᵀ, alpha=scale)) @ v.
    Pattern("baddbmm-softmax-bmm", "matmul-softmax", is_softmax, read_baddbmm_attention, _HAND_WRITTEN_CHECKS),
    # softmax(anything else) @ v: reported, left exact.
    Pattern("unmodelled-scores", "matmul-softmax", is_softmax, read_unmodelled_scores, (_unmodelled_scores,)),
)


def first_match(node: fx.Node, patterns: tuple[Pattern, ...] = PATTERNS) -> tuple[Pattern, Reading] | None:
    """The first pattern of the table that reads `node` as an attention's core, with its reading."""
    for pattern in patterns:
        if pattern.is_core(node):
            reading = pattern.read(node)
            if reading is not None:
                return pattern, reading
    return None


def find_sites(graph: fx.Graph, patterns: tuple[Pattern, ...] = PATTERNS) -> list[Site]:
    """Every attention site of the graph with its verdict (replaceable or the reason it is not), in graph order."""
    dataflow = _dataflow(graph)
    found = [match for node in graph.nodes if (match := first_match(node, patterns))]
    # Sites without a module path are numbered by kind in table order, then graph order: the
    # names ("attention.3") configs were saved under.
    kinds = list(dict.fromkeys(p.kind for p in patterns))
    found.sort(key=lambda match: kinds.index(match[0].kind))
    sites = [_judge(pattern, reading, ordinal, graph, dataflow)
             for ordinal, (pattern, reading) in enumerate(found)]
    order = {node: i for i, node in enumerate(graph.nodes)}
    return sorted(sites, key=lambda s: order[s.node])


def _dataflow(graph: fx.Graph) -> "nx.DiGraph":
    """The graph's data dependencies as a networkx DiGraph (edges producer -> consumer)."""
    flow = nx.DiGraph()
    for node in graph.nodes:
        flow.add_node(node)
        for producer in node.all_input_nodes:
            flow.add_edge(producer, node)
    return flow


def _judge(pattern: Pattern, reading: Reading, ordinal: int, graph: fx.Graph, dataflow: "nx.DiGraph") -> Site:
    name = site_name(reading.node, ordinal)
    site = Site(node=reading.node, name=name, layer=layer_index(name), kind=pattern.kind, query=reading.query,
                key=reading.key, value=reading.value, scale=reading.scale)
    candidate = Candidate(site, reading, graph, lambda node: nx.ancestors(dataflow, node))
    site.reason = next((reason for check in pattern.checks if (reason := check(candidate))), "")
    site.replaceable = not site.reason
    return site
