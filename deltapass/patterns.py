"""How attention looks in a Dynamo FX graph: small matchers that read an attention's parts, no verdicts.

Each reader starts at the core node of one attention form (an SDPA call, or the softmax of
hand-written matmul-softmax-matmul attention) and returns a Reading: the node the site replaces,
q/k/v, the scale, the mask and what the checks need, or None when the node is not that form.
deltapass.sites pairs each reader with its checks in one table.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_MATMULS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_MULS, _MUL_METHODS = {operator.mul, operator.imul, torch.mul}, {"mul", "mul_"}
_DIVS, _DIV_METHODS = {operator.truediv, operator.itruediv, torch.div}, {"div", "div_"}
_SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax}
_CASTS = {"to", "float", "half", "bfloat16", "type_as", "type"}


@dataclass(frozen=True)
class Reading:
    """One attention as a pattern reads it off the graph."""

    node: fx.Node                     # computes the attention output: the node the rewrite replaces
    query: fx.Node
    key: fx.Node                      # K and V as the attention sees them (grouped-query expansion included)
    value: fx.Node
    scale: Any                        # a number, None (1/sqrt(head_dim)) or a node computed at run time
    # (kind, mask node[, fill value]) that must prove causality; kinds as in deltapass.kernels.MASK_KINDS,
    # or "two masks" (a baddbmm input and another mask)
    mask: tuple | None = None
    softmax: fx.Node | None = None    # hand-written forms: their softmax
    dropout: tuple | None = None      # (p, training) of a dropout on the probabilities; SDPA: (dropout_p, True)
    is_causal: Any = None             # SDPA: its flag, True where a mask stands in for it (that mask is `mask`)
    other_mask: Any = None            # SDPA: a mask given together with is_causal (not modelled)
    gqa_in_op: Any = False            # SDPA: enable_gqa (the op itself groups K/V)


def example_value(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node, if any."""
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        return value if isinstance(value, torch.Tensor) else None
    return None


def is_call(node, functions=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target in methods))


def _argument(node: fx.Node, position: int, name: str, default=None):
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)


# ---- peelers: each steps over one thing between the attention's parts ----

def ungrouped_kv(node: fx.Node) -> fx.Node:
    """The K/V tensor before a grouped-query expansion (repeat_kv or repeat_interleave on dim 1), if any."""
    # repeat_interleave(x, n, dim=1) / x.repeat_interleave(n, dim=1)
    if is_call(node, functions={torch.repeat_interleave}, methods={"repeat_interleave"}):
        if _argument(node, 2, "dim") == 1 and isinstance(node.args[0], fx.Node):
            return node.args[0]
    # x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    if is_call(node, methods={"reshape", "view"}):
        expanded = node.args[0]
        if is_call(expanded, methods={"expand"}) and isinstance(expanded.args[0], fx.Node):
            source = _unsqueezed_at_2(expanded.args[0])
            if source is not None and len(expanded.users) == 1:
                return source
    return node


def _unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    """x for x.unsqueeze(2) / x[:, :, None, :, :]."""
    if is_call(node, methods={"unsqueeze"}) and node.args[1:] == (2,):
        return node.args[0]
    if is_call(node, functions={operator.getitem}):
        source, index = node.args
        if (isinstance(index, tuple) and len(index) == 5 and index[2] is None
                and all(i == slice(None) for i in index[:2] + index[3:])):
            return source
    return None


def casts_before(node: fx.Node) -> fx.Node:
    """Step back over dtype casts to the tensor they cast."""
    while is_call(node, methods=_CASTS):
        node = node.args[0]
    return node


def casts_after(node: fx.Node) -> fx.Node:
    """Step forward over dtype casts that are a node's only user."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (is_call(user, methods=_CASTS) and user.args[0] is node):
            break
        node = user
    return node


def transposed_last_two(node) -> fx.Node | None:
    """x for x.transpose(-2, -1) / transpose(2, 3) / permute(0, 1, 3, 2) / torch.transpose(x, -2, -1)."""
    if not isinstance(node, fx.Node):
        return None
    meta = example_value(node)
    rank = meta.dim() if meta is not None else 4
    if is_call(node, functions={torch.transpose}, methods={"transpose"}):
        if {d % rank for d in node.args[1:3] if isinstance(d, int)} == {rank - 2, rank - 1}:
            return node.args[0]
    if is_call(node, methods={"permute"}):
        perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if list(perm) == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    return None


def peel_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """(scores * c) or (scores / c) -> (scores, c or 1/c); anything else -> (node, 1.0)."""
    if is_call(node, functions=_MULS, methods=_MUL_METHODS):
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return b, float(a)
    if is_call(node, functions=_DIVS, methods=_DIV_METHODS):
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node) and "rounding_mode" not in node.kwargs:
            return a, 1.0 / float(b)
    return node, 1.0


def peel_mask(node: fx.Node) -> tuple[fx.Node, tuple | None]:
    """scores + m (additive), scores.masked_fill(m, v) (m = blocked), where(m, scores, v) (m = kept).

    Returns (scores, (kind, mask node[, fill value])), or (node, None) when there is no mask to peel.
    """
    if is_call(node, functions={operator.add, torch.add}, methods={"add"}) and len(node.args) == 2:
        a, b = node.args
        scored = [x for x in (a, b) if isinstance(x, fx.Node) and _looks_like_scores(casts_before(x))]
        if len(scored) == 1 and isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return scored[0], ("additive", b if scored[0] is a else a)
    if is_call(node, functions={torch.masked_fill}, methods={"masked_fill"}):
        return node.args[0], ("blocked", node.args[1], _argument(node, 2, "value"))
    if is_call(node, functions={torch.where}) and len(node.args) == 3 and isinstance(node.args[1], fx.Node):
        return node.args[1], ("keep", node.args[0], node.args[2])
    return node, None


def _looks_like_scores(node: fx.Node) -> bool:
    """Which side of `a + b` is q kᵀ (maybe scaled) and which the mask."""
    return is_call(node, functions=_MATMULS | _MULS | _DIVS, methods=_MATMUL_METHODS | _MUL_METHODS | _DIV_METHODS)


def _dropout_arguments(node: fx.Node) -> tuple:
    """(p, training) of F.dropout / x.dropout."""
    return _argument(node, 1, "p", 0.5), _argument(node, 2, "training", True)


# ---- readers: one per attention form; core node -> Reading, or None when it is not that form ----

def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_softmax(node: fx.Node) -> bool:
    return is_call(node, functions=_SOFTMAXES, methods={"softmax"})


def read_sdpa(node: fx.Node) -> Reading:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    mask = args["attn_mask"]
    common = dict(node=node, query=args["query"], key=args["key"], value=args["value"], scale=args["scale"],
                  dropout=(args["dropout_p"], True), gqa_in_op=args["enable_gqa"])
    if isinstance(mask, fx.Node) and args["is_causal"] is False:
        # A mask in place of is_causal: causal when the mask proves it (or passes its per-call check).
        meta = example_value(mask)
        kind = "keep" if meta is not None and meta.dtype == torch.bool else "additive"
        return Reading(**common, mask=(kind, mask), is_causal=True)
    return Reading(**common, is_causal=args["is_causal"], other_mask=mask)


def _hand_written(softmax: fx.Node, query_and_key: Callable) -> Reading | None:
    """scores [* scale] [cast] [mask] [cast] -> softmax -> [cast] [dropout] [cast] -> matmul(p, v).

    query_and_key(scores, mask, scale) reads the scores' producer: (q, k, mask, scale), or None.
    """
    probabilities_times_value = _probabilities_times_value(softmax)
    if probabilities_times_value is None:
        return None
    dropout, pv = probabilities_times_value
    scores, mask = peel_mask(casts_before(softmax.args[0]))
    scores, scale = peel_scale(casts_before(scores))
    read = query_and_key(scores, mask, scale)
    if read is None:
        return None
    q, k, mask, scale = read
    return Reading(node=pv, query=q, key=k, value=pv.args[1], scale=scale, mask=mask, softmax=softmax,
                   dropout=dropout)


def _probabilities_times_value(softmax: fx.Node) -> tuple[tuple | None, fx.Node] | None:
    """((p, training) of a dropout or None, matmul(p, v)) when the softmax's output, alone, is multiplied by V."""
    node = casts_after(softmax)
    dropout = None
    if len(node.users) == 1 and is_call(next(iter(node.users)), functions={torch.nn.functional.dropout},
                                        methods={"dropout"}):
        dropout_node = next(iter(node.users))
        dropout = _dropout_arguments(dropout_node)
        node = casts_after(dropout_node)
    if len(node.users) != 1:
        return None
    pv = next(iter(node.users))
    if not (is_call(pv, functions=_MATMULS, methods=_MATMUL_METHODS) and pv.args[0] is node):
        return None
    return dropout, pv


def _matmul_query_key(scores: fx.Node, mask, scale):
    """matmul(q, kᵀ) / q @ kᵀ / bmm(q, kᵀ)."""
    if not is_call(scores, functions=_MATMULS, methods=_MATMUL_METHODS):
        return None
    q, k = scores.args[0], transposed_last_two(scores.args[1])
    return None if k is None else (q, k, mask, scale)


def _baddbmm_query_key(scores: fx.Node, mask, scale):
    """baddbmm(input, q, kᵀ, beta=b, alpha=a) = b * input + a * q kᵀ: alpha is a scale, input a mask."""
    if not is_call(scores, functions={torch.baddbmm}, methods={"baddbmm"}):
        return None
    bias, q, kt = scores.args[:3]
    beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
    k = transposed_last_two(kt)
    if not (isinstance(beta, (int, float)) and isinstance(alpha, (int, float))) or k is None:
        return None
    if beta != 0:
        mask = ("additive", bias) if mask is None and beta == 1 else ("two masks", bias)
    return q, k, mask, scale * float(alpha)


def read_matmul_attention(softmax: fx.Node) -> Reading | None:
    return _hand_written(softmax, _matmul_query_key)


def read_baddbmm_attention(softmax: fx.Node) -> Reading | None:
    return _hand_written(softmax, _baddbmm_query_key)


def read_unmodelled_scores(softmax: fx.Node) -> Reading | None:
    """softmax(...) @ v whose scores no other reader can read: a site to report (q and k unknown)."""
    return _hand_written(softmax, lambda scores, mask, scale: (softmax, softmax, None, None))
