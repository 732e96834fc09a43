"""What identifies a model to the tuned-config cache: its attention layout and its weights.

The fingerprint hashes (1) the replaceable sites' layout: (site name, q heads, kv heads, head dim),
and (2) every parameter and buffer the graph reads: shape, dtype and 16 evenly spaced sampled values.
So other weights (a fine-tune, another checkpoint), another MLP or vocab size, and another RoPE
(its inv_freq buffer) all change it; sequence length, batch size and the prompt do not. Names of
parameters are left out on purpose: they depend on how the model was handed to torch.compile.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

import torch
import torch.fx as fx

Signature = list[tuple[str, int | None, int | None, int]]
_SAMPLES = 16


def hint(size) -> int:
    """An int from a size that may be a SymInt, read from its hint so no guard is added."""
    if isinstance(size, int):
        return size
    value = size.node.hint
    if value is None:
        raise ValueError(f"size {size!r} has no hint (unbacked)")
    return int(value)


def tensor_meta(node: fx.Node) -> torch.Tensor:
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"node {node.name!r} has no tensor metadata")
    return value


def signature_from_sites(sites: Iterable) -> Signature:
    """The attention layout of a graph: its replaceable sites (the only ones a config reaches).

    Heads come from Q and from the site's (un-grouped) K, so a GQA model records its real KV
    heads however it expands them. In the 3-D [batch * heads, seq, head_dim] form heads cannot
    be told from batch and are recorded as None.
    """
    signature: Signature = []
    for site in sites:
        if not site.replaceable:
            continue
        q, k = tensor_meta(site.query), tensor_meta(site.key)
        if q.dim() == 4:
            signature.append((site.name, hint(q.shape[1]), hint(k.shape[1]), hint(q.shape[-1])))
        else:
            signature.append((site.name, None, None, hint(q.shape[-1])))
    return signature


def prompt_tokens(sites: Iterable):
    """The prompt length a graph attends over: the longest key length of its replaceable sites (an int or a
    SymInt); a whole prompt's query length, and for a chunk over a KV cache its keys (the prompt so far)."""
    lengths = [tensor_meta(s.key).shape[-2] for s in sites if s.replaceable]
    if not lengths:
        raise ValueError("no replaceable attention site to read the query length from")
    return max(lengths, key=hint)


def weight_tensors(gm: fx.GraphModule, example_inputs: Sequence) -> list[torch.Tensor]:
    """The parameters and buffers among a Dynamo graph's inputs (Dynamo lifts module state to inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = []
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and (isinstance(value, torch.nn.Parameter)
                                                 or "_parameters_" in node.name or "_buffers_" in node.name):
            weights.append(value)
    weights += [t for t in list(gm.parameters()) + list(gm.buffers())]   # graphs that keep modules
    return weights


def weight_digest(weights: Sequence[torch.Tensor]) -> str:
    """sha256 of each tensor's shape, dtype and sampled values, order-independent; one host copy in all."""
    if not weights:
        return "none"
    samples = []
    with torch.no_grad():
        for t in weights:
            flat = t.detach().reshape(-1)
            count = min(_SAMPLES, flat.numel())
            # Integer spacing: float positions round past the end of tensors over 2**24 elements.
            index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            samples.append(flat[index].float())
        host = torch.cat([s.to(weights[0].device) for s in samples]).cpu()
    rows, offset = [], 0
    for t, s in zip(weights, samples):
        values = host[offset:offset + s.numel()].tolist()
        offset += s.numel()
        rows.append(json.dumps([list(t.shape), str(t.dtype), [round(v, 6) for v in values]]))
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def model_fingerprint(signature: Sequence[Sequence], weights: str = "none") -> str:
    """sha256 (first 16 hex) of the canonical JSON of the attention signature and the weight digest."""
    canonical = json.dumps({"sites": [list(item) for item in signature], "weights": weights},
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def graph_fingerprint(gm: fx.GraphModule, example_inputs: Sequence, sites: Iterable) -> str:
    return model_fingerprint(signature_from_sites(sites), weight_digest(weight_tensors(gm, example_inputs)))
