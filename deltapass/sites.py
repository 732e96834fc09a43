"""Finding attention sites in a Dynamo FX graph and deciding, with a reason, which may take the Δ op.

A site is one attention computation. It is replaceable only when the pass can
prove it is causal self-attention at prefill: causal by construction
(is_causal=True with no mask, or a mask computed from shapes that evaluates to
the causal triangle), equal query and key lengths, no dropout, and shapes and
dtypes the kernels take. A mask that comes from the model's inputs cannot be
proven at compile time: such a site takes the masked op, which checks the mask
per call and runs exact attention under it unless it is exactly causal.
Anything else stays exact and says why.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from deltapass.kernels import keeps_exactly_causal, unsupported_reason
from deltapass.kernels.masked import BLOCKED_BELOW

from .fingerprint import hint

SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


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


def _sdpa_arguments(node: fx.Node) -> dict:
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _meta(node) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _known_equal(a, b) -> bool:
    """a == b for ints or SymInts, without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def ungrouped_kv(node: fx.Node) -> fx.Node:
    """The K/V tensor before a grouped-query expansion (repeat_kv or repeat_interleave on dim 1), if any."""
    # repeat_interleave(x, n, dim=1) / x.repeat_interleave(n, dim=1)
    if node.op in ("call_function", "call_method") and node.target in (torch.repeat_interleave, "repeat_interleave"):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        if dim == 1 and isinstance(node.args[0], fx.Node):
            return node.args[0]
    # x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
    if node.op == "call_method" and node.target in ("reshape", "view"):
        expanded = node.args[0]
        if (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"
                and isinstance(expanded.args[0], fx.Node)):
            unsqueezed = expanded.args[0]
            source = _unsqueezed_at_2(unsqueezed)
            if source is not None and len(expanded.users) == 1:
                return source
    return node


def _unsqueezed_at_2(node: fx.Node) -> fx.Node | None:
    if node.op == "call_method" and node.target == "unsqueeze" and node.args[1:] == (2,):
        return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if (isinstance(index, tuple) and len(index) == 5 and index[2] is None
                and all(i == slice(None) for i in index[:2] + index[3:])):
            return source
    return None


def find_sites(graph: fx.Graph) -> list[Site]:
    """Every attention site of the graph with its verdict (replaceable or the reason it is not), in graph order."""
    sites = []
    dataflow = _dataflow(graph)
    ancestry = lambda n: nx.ancestors(dataflow, n)  # noqa: E731
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(_judge_sdpa(node, len(sites), graph, ancestry))
    sites += find_matmul_softmax_sites(graph, len(sites), ancestry)
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


def _judge_sdpa(node: fx.Node, ordinal: int, graph: fx.Graph, ancestry) -> Site:
    args = _sdpa_arguments(node)
    name = site_name(node, ordinal)
    site = Site(node=node, name=name, layer=layer_index(name), kind="sdpa", query=args["query"],
                key=args["key"], value=args["value"], scale=args["scale"])
    mask = args["attn_mask"]
    if isinstance(mask, fx.Node) and args["is_causal"] is False:
        # A mask built only from shapes is evaluated here: exactly causal means is_causal=True.
        mask_meta = _meta(mask)
        kind = "keep" if mask_meta is not None and mask_meta.dtype == torch.bool else "additive"
        site.reason = _judge_mask(site, (kind, mask), args["query"], args["key"], graph, ancestry)
        args = {**args, "attn_mask": None, "is_causal": True}
    site.reason = site.reason or _sdpa_blocker(args)
    if site.reason:
        return site
    if not args["enable_gqa"]:
        site.key, site.value = ungrouped_kv(args["key"]), ungrouped_kv(args["value"])
        if site.key is not args["key"]:
            site.notes.append("grouped-query expansion of K/V removed; the kernel reads K/V per group")
        if (site.key is args["key"]) != (site.value is args["value"]):
            site.key, site.value = args["key"], args["value"]
    site.replaceable = True
    return site


def _sdpa_blocker(args: dict) -> str:
    """Why this SDPA call cannot take the Δ op ("" if it can)."""
    if isinstance(args["dropout_p"], fx.Node) or args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']} (training-time dropout is not Δ attention)"
    if args["attn_mask"] is not None:
        return "explicit attention mask (not provably causal: padding, sliding window or custom mask)"
    if args["is_causal"] is not True:
        return f"is_causal={args['is_causal']} (not causal attention)"
    if not isinstance(args["scale"], (float, int, type(None))):
        return "scale is computed at run time"
    q, k, v = (_meta(args[name]) for name in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "query/key/value shapes unknown at compile time"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"not 4-D [batch, heads, seq, head_dim] (q {tuple(q.shape)})"
    return _tensor_blocker(q, k, v, tuple(q.shape), tuple(k.shape), tuple(v.shape))


def _tensor_blocker(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_shape: tuple, k_shape: tuple,
                    v_shape: tuple) -> str:
    """Why q, k, v (seen as [batch, heads, seq, head_dim] shapes) cannot take the Δ op ("" if they can).

    Self-attention prefill is the pass's own condition; the op's input limits are the kernels' one
    definition (deltapass.kernels.unsupported_reason), read with sizes at their hints.
    """
    if not _known_equal(q_shape[2], k_shape[2]):
        return f"query length {q_shape[2]} != key length {k_shape[2]} (cross-attention or decode with cache)"
    if _known_equal(q_shape[2], 1):
        return "decode step (query length 1)"
    shapes = [tuple(hint(d) for d in shape) for shape in (q_shape, k_shape, v_shape)]
    return unsupported_reason(*shapes, q.dtype, k.dtype, v.dtype, q.device.type, q.requires_grad)


# ---- hand-written attention: matmul(q, kᵀ) [* scale] [+ mask] -> softmax -> [dropout] -> matmul(p, v) ----

_MATMULS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_SOFTMAX_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax}
_CASTS = {"to", "float", "half", "bfloat16", "type_as", "type"}


def _is_call(node, functions=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target in methods))


def _skip_casts(node: fx.Node, forward: bool) -> fx.Node:
    """Step over dtype casts: to the input (backward) or the single user (forward)."""
    while True:
        if forward:
            if len(node.users) != 1:
                return node
            nxt = next(iter(node.users))
            if _is_call(nxt, methods=_CASTS) and nxt.args[0] is node:
                node = nxt
                continue
            return node
        if _is_call(node, methods=_CASTS):
            node = node.args[0]
            continue
        return node


def _softmax_dim(node: fx.Node):
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim


def _transposed_last_two(node) -> fx.Node | None:
    """x for x.transpose(-2, -1) / transpose(2, 3) / permute(0, 1, 3, 2) / torch.transpose(x, -2, -1)."""
    if not isinstance(node, fx.Node):
        return None
    rank = (_meta(node).dim() if _meta(node) is not None else 4)
    if _is_call(node, functions={torch.transpose}, methods={"transpose"}):
        dims = {d % rank for d in node.args[1:3] if isinstance(d, int)}
        if dims == {rank - 2, rank - 1}:
            return node.args[0]
    if _is_call(node, methods={"permute"}):
        perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if list(perm) == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    return None


def _scale_of(node: fx.Node) -> tuple[fx.Node, float]:
    """Peel a constant scale: (scores * c) or (scores / c) -> (scores, c or 1/c)."""
    if _is_call(node, functions={operator.mul, operator.imul, torch.mul}, methods={"mul", "mul_"}):
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return b, float(a)
    if _is_call(node, functions={operator.truediv, operator.itruediv, torch.div}, methods={"div", "div_"}):
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node) and "rounding_mode" not in node.kwargs:
            return a, 1.0 / float(b)
    return node, 1.0


def _peel_mask(node: fx.Node) -> tuple[fx.Node, tuple | None]:
    """Peel a mask: scores + m (additive), scores.masked_fill(m, v) (m = blocked), where(m, scores, v) (m = kept).

    Returns (scores, (kind, mask node[, fill value])); kinds as in deltapass.kernels.MASK_KINDS.
    """
    if _is_call(node, functions={operator.add, torch.add}, methods={"add"}) and len(node.args) == 2:
        a, b = node.args
        scored = [x for x in (a, b) if isinstance(x, fx.Node) and _is_call(_skip_casts(x, False),
                  functions=_MATMULS | {operator.mul, operator.imul, torch.mul, operator.truediv,
                                        operator.itruediv, torch.div},
                  methods=_MATMUL_METHODS | {"mul", "div", "mul_", "div_"})]
        if len(scored) == 1 and isinstance(a, fx.Node) and isinstance(b, fx.Node):
            other = b if scored[0] is a else a
            return scored[0], ("additive", other)
    if _is_call(node, functions={torch.masked_fill}, methods={"masked_fill"}):
        value = node.kwargs.get("value", node.args[2] if len(node.args) > 2 else None)
        return node.args[0], ("blocked", node.args[1], value)
    if _is_call(node, functions={torch.where}) and len(node.args) == 3 and isinstance(node.args[1], fx.Node):
        return node.args[1], ("keep", node.args[0], node.args[2])
    return node, None


def find_matmul_softmax_sites(graph: fx.Graph, start_ordinal: int, ancestry) -> list[Site]:
    sites = []
    for node in graph.nodes:
        if not _is_call(node, functions=_SOFTMAX_FUNCTIONS, methods={"softmax"}):
            continue
        site = _judge_softmax(node, start_ordinal + len(sites), graph, ancestry)
        if site is not None:
            sites.append(site)
    return sites


def _judge_softmax(softmax: fx.Node, ordinal: int, graph: fx.Graph, ancestry) -> Site | None:
    """Match the attention around one softmax; None when the softmax is not an attention's."""
    # Forward: [cast] [dropout] [cast] -> matmul(p, v)
    node = _skip_casts(softmax, forward=True)
    dropout = None
    if len(node.users) == 1 and _is_call(next(iter(node.users)), functions={torch.nn.functional.dropout},
                                          methods={"dropout"}):
        dropout = next(iter(node.users))
        node = _skip_casts(dropout, forward=True)
    if len(node.users) != 1:
        return None
    pv = next(iter(node.users))
    if not (_is_call(pv, functions=_MATMULS, methods=_MATMUL_METHODS) and pv.args[0] is node):
        return None
    # Backward: [cast] [mask] [cast] [scale] matmul(q, kᵀ)
    scores = _skip_casts(softmax.args[0], forward=False)
    scores, mask = _peel_mask(scores)
    scores = _skip_casts(scores, forward=False)
    scores, scale = _scale_of(scores)
    v = pv.args[1]
    q, kt = (scores.args[:2] if _is_call(scores, functions=_MATMULS, methods=_MATMUL_METHODS) else (None, None))
    if _is_call(scores, functions={torch.baddbmm}, methods={"baddbmm"}):
        # baddbmm(input, q, kᵀ, beta=b, alpha=a) = b * input + a * q kᵀ: alpha is the scale, input a mask
        bias, q, kt = scores.args[:3]
        beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
        if not (isinstance(beta, (int, float)) and isinstance(alpha, (int, float))):
            q = kt = None
        else:
            scale *= float(alpha)
            if beta != 0:
                mask = ("additive", bias) if mask is None and beta == 1 else ("two masks", bias)
    k = _transposed_last_two(kt)
    if k is None:
        # softmax(...) @ v whose scores the matcher cannot read: report it, leave it exact.
        name = site_name(pv, ordinal)
        return Site(node=pv, name=name, layer=layer_index(name), kind="matmul-softmax", query=softmax,
                    key=softmax, value=v, scale=None,
                    reason="scores pass through ops the pass does not model (e.g. logit soft-capping)")
    name = site_name(pv, ordinal)
    site = Site(node=pv, name=name, layer=layer_index(name), kind="matmul-softmax", query=q,
                key=ungrouped_kv(k), value=ungrouped_kv(v), scale=scale)
    if (site.key is k) != (site.value is v):
        site.key, site.value = k, v
    elif site.key is not k:
        site.notes.append("grouped-query expansion of K/V removed; the kernel reads K/V per group")
    site.reason = (_softmax_blocker(softmax, dropout)
                   or _judge_mask(site, mask, q, k, graph, ancestry)
                   or _shape_blocker(q, k, v))
    site.replaceable = not site.reason
    return site


def _softmax_blocker(softmax: fx.Node, dropout: fx.Node | None) -> str:
    dim = _softmax_dim(softmax)
    meta = _meta(softmax)
    rank = meta.dim() if meta is not None else 4
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return f"softmax over dim {dim}, not the key dim"
    if dropout is not None:
        p = dropout.kwargs.get("p", dropout.args[1] if len(dropout.args) > 1 else 0.5)
        training = dropout.kwargs.get("training", dropout.args[2] if len(dropout.args) > 2 else True)
        if training is not False and p != 0.0:
            return f"dropout_p={p} in training (training-time dropout is not Δ attention)"
    return ""


def _shape_blocker(q, k, v) -> str:
    qm, km, vm = _meta(q), _meta(k), _meta(v)
    if qm is None or km is None or vm is None:
        return "query/key/value shapes unknown at compile time"
    if not (qm.dim() == km.dim() == vm.dim() and qm.dim() in (3, 4)):
        return (f"{qm.dim()}-D attention (the pass rewrites [batch, heads, seq, head_dim] "
                "and [batch * heads, seq, head_dim] forms)")
    if qm.dim() == 3:
        # bmm form: the leading dim folds batch and heads, so K/V must match Q there (no grouping to see).
        if not (_known_equal(qm.shape[0], km.shape[0]) and _known_equal(km.shape[0], vm.shape[0])):
            return f"3-D attention with q {tuple(qm.shape)}, k {tuple(km.shape)}: leading dims differ"
        return _tensor_blocker(qm, km, vm, (1, *qm.shape), (1, *km.shape), (1, *vm.shape))
    return _tensor_blocker(qm, km, vm, tuple(qm.shape), tuple(km.shape), tuple(vm.shape))


def _judge_mask(site: Site, mask, q, k, graph: fx.Graph, ancestry) -> str:
    """'' when the mask provably keeps exactly the causal keys, or can be checked per call; else why not.

    A mask computed from shapes alone is evaluated here, once. A mask that depends on the
    model's inputs (a padding mask, say) is left to a run-time check: the site gets the
    masked Δ op, which falls back to exact attention under that mask when it is not causal.
    """
    if mask is None:
        return "no mask (not causal attention)"
    kind, mask_node, *fill = mask
    if kind == "two masks":
        return "scores get two masks or a scaled mask (baddbmm input and another mask)"
    if fill and not (isinstance(fill[0], (int, float)) and fill[0] <= BLOCKED_BELOW):
        return f"masked scores are set to {fill[0]!r}, not -inf (a bias, not a mask)"
    qm, km, mm = _meta(q), _meta(k), _meta(mask_node)
    if qm is None or km is None or mm is None or mm.dim() < 2:
        return "mask or query/key shapes unknown at compile time"
    n_q, n_k = qm.shape[-2], km.shape[-2]
    if not (_known_equal(n_q, n_k) and _known_equal(mm.shape[-2], n_q) and _known_equal(mm.shape[-1], n_k)):
        return "mask shape does not match a square self-attention"
    if (kind == "additive") == (mm.dtype == torch.bool):
        return f"{kind} mask of dtype {mm.dtype}"
    inputs = sorted(a.name for a in ancestry(mask_node) | {mask_node} if a.op == "placeholder")
    if inputs:
        site.runtime_mask = (kind, mask_node)
        site.notes.append(f"mask comes from the inputs ({', '.join(inputs)[:80]}): checked per call, "
                          "Δ when exactly causal, exact attention under the mask otherwise")
        return ""
    try:
        value = _evaluate(mask_node, graph, ancestry)
    except Exception as exc:
        return f"mask could not be evaluated at compile time ({type(exc).__name__})"
    if not bool(keeps_exactly_causal(value, kind)):
        return "mask is not causal (sliding window, bidirectional, bias or custom pattern)"
    site.notes.append("mask proven causal at compile time")
    return ""


def _evaluate(target: fx.Node, graph: fx.Graph, ancestry) -> torch.Tensor:
    """Run the constant subgraph that computes `target` (it has no placeholders among its ancestors)."""
    needed = ancestry(target) | {target}
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
