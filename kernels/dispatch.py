"""Which kernels run a prefill: the Hopper (Gluon) kernels on sm_90 where they fit, else the Triton kernels.

Both compute the same rule from the same DeltaPlan; only speed differs. LaunchConfig.hopper chooses:
1 requires the Hopper kernels (a ValueError says why they cannot run), -1 never takes them, 0 takes them
whenever `hopper_reason` finds nothing against it.
"""
from __future__ import annotations

from types import MappingProxyType

import torch

from .launch import LaunchConfig
from .rule import DeltaPlan

# What the kernels are, for the tuned-config cache: their speed is what a tuner measured, so an entry tuned
# under another revision is stale. Bump it whenever a kernel change moves latency.
# 8: the Triton kernels' row helpers take a chunk's start and prompt length (a few integer ops per tile, not yet
# timed on a GPU), so entries tuned under 7 are reported stale rather than assumed to hold.
KERNELS_REVISION = ("8 (Hopper Gluon kernels on sm_90 for whole prompts, a persistent sparse launch with ping-pong "
                    "and Q by TMA, edge tiles masked by one key interval per row, dense rows in key chunks, a model's "
                    "transposed q/k/v read in place and the output in q's layout; Triton kernels elsewhere and for "
                    "chunks of a prompt, their rows placed by start and prompt length)")
HOPPER_HEAD_DIMS = (64, 128)
HOPPER_BLOCK_N = (64, 128)
# Gluon changes between Triton releases: the Hopper kernels run on the releases a GPU checked them with.
# (They also compile with CI's Triton 3.9, tests/test_hopper_compile.py; no GPU has run that build.)
HOPPER_TRITON = ("3.6.",)
# The Hopper launcher's schedule keywords as the op runs them (BENCHMARKS.md, "Hopper kernels"): ping-pong
# and the persistent grid with Q loaded ahead help the sparse launch; ping-pong slows the dense rows.
HOPPER_SCHEDULE = MappingProxyType({"pingpong": True, "persistent_q": True})
# Shared memory a CTA may take on sm_90 (227 KiB).
HOPPER_SHARED_MEMORY = 232448


def _launch_reason(launch: LaunchConfig, head_dim: int) -> str:
    """Why these launch parameters do not fit the Hopper kernels ("" when they do)."""
    from .hopper_delta import shared_memory_bytes

    if launch.kv_tma == -1:
        return "launch parameter kv_tma=-1 asks for plain K/V loads; the Hopper kernels load K/V with TMA"
    resolved = launch.resolved(head_dim, torch.device("cuda"), hopper=True)
    # With HOPPER_SCHEDULE's persistent_q the sparse launch double-buffers Q; the dense-rows launch never does.
    for prefix, q_buffers in (("", 2 if HOPPER_SCHEDULE["persistent_q"] else 1), ("dense_", 1)):
        block_n, stages = getattr(resolved, prefix + "block_n"), getattr(resolved, prefix + "num_stages")
        if block_n not in HOPPER_BLOCK_N:
            return f"the Hopper kernels take {prefix}block_n in {HOPPER_BLOCK_N}, got {prefix}block_n={block_n}"
        need = shared_memory_bytes(head_dim, block_n, stages, q_buffers)
        if need > HOPPER_SHARED_MEMORY:
            return (f"{prefix}block_n={block_n} with {prefix}num_stages={stages} needs {need} bytes of shared "
                    f"memory at head_dim={head_dim}; sm_90 has {HOPPER_SHARED_MEMORY}")
    return ""


def hopper_reason_for(device: torch.device, dtype: torch.dtype, head_dim: int, launch: LaunchConfig) -> str:
    """Why the Hopper kernels cannot run inputs of this device, dtype and head dim with these launch parameters
    ("" when they can), short of the tensors' own strides and the plan (hopper_reason checks those too)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return f"the Hopper kernels need an sm_90 GPU, got {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the Hopper kernels take float16 or bfloat16, got {dtype}"
    if head_dim not in HOPPER_HEAD_DIMS:
        return f"the Hopper kernels take head dims {HOPPER_HEAD_DIMS}, got {head_dim}"
    import triton

    if not triton.__version__.startswith(HOPPER_TRITON):
        checked = ", ".join(release + "x" for release in HOPPER_TRITON)
        return f"Triton {triton.__version__} is not a release a GPU checked them on (checked: {checked})"
    return _launch_reason(launch, head_dim)


def hopper_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, launch: LaunchConfig,
                  plan: DeltaPlan | None = None) -> str:
    """Why the Hopper kernels cannot run these inputs with these launch parameters and this plan ("" when
    they can; plan None: a whole prompt of q's length)."""
    from .triton_delta import tma_aligned

    if q.shape[2] != k.shape[2] or (plan is not None and plan.prompt_length != plan.n):
        # Their row helpers get start 0 and their work items index q by position: not yet threaded through.
        return (f"the Hopper kernels run whole prompts only (query length == key length == prompt length), "
                f"got N_q={q.shape[2]}, N_k={k.shape[2]}, prompt_length={plan.prompt_length if plan else None}")

    for name, t in (("k", k), ("v", v)):
        if q.device.type == "cuda" and not tma_aligned(t):
            return f"TMA needs 16-byte aligned {name}, got {name}.stride()={tuple(t.stride())}"
    return hopper_reason_for(q.device, q.dtype, q.shape[-1], launch)


def kernels_for(device: torch.device, dtype: torch.dtype, head_dim: int, launch: LaunchConfig,
                chunk: bool = False) -> str:
    """Which kernels the Δ op runs for inputs like these, and why not the Hopper ones, in words (explain()).

    chunk: the queries are a chunk of a prompt over a KV cache (hopper_reason refuses those)."""
    if device.type == "cpu":
        from .op import _interpreting

        if _interpreting():
            return "the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)"
        return "the exact float32 reference of the rule (CPU; TRITON_INTERPRET=1 runs the Triton kernels)"
    if launch.hopper == -1:
        return "the Triton kernels (launch parameter hopper=-1)"
    reason = hopper_reason_for(device, dtype, head_dim, launch) or (
        "they run whole prompts only, and these sites are chunks over a KV cache" if chunk else "")
    return "the Hopper kernels (Gluon, sm_90)" if not reason else f"the Triton kernels (Hopper kernels off: {reason})"


def launch_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: DeltaPlan,
                 scale: float, launch: LaunchConfig, delta: torch.Tensor | None = None) -> torch.Tensor:
    """Run the rule's kernels into `out` on the path `launch.hopper` picks (see the module docstring)."""
    head_dim = q.shape[-1]
    reason = hopper_reason(q, k, v, launch, plan) if launch.hopper >= 0 else "launch parameter hopper=-1"
    if launch.hopper == 1 and reason:
        raise ValueError(f"launch parameter hopper=1, but {reason}")
    if not reason:
        return _hopper_by_sequence(q, k, v, out, plan, scale, launch.resolved(head_dim, q.device, hopper=True),
                                   delta)
    from .triton_delta import launch_delta_attention

    return launch_delta_attention(q, k, v, out, plan, scale, launch.resolved(head_dim, q.device), delta)


def _hopper_by_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: DeltaPlan,
                        scale: float, tiles: LaunchConfig, delta: torch.Tensor | None) -> torch.Tensor:
    """The Hopper kernels on one sequence at a time, reading q, k and v where they are.

    The kernels address q, k and v through TMA descriptors (and q's and out's rows through their strides),
    so strided views such as the transposed [B, N, H, D] projections a compiled model passes go in as
    they are, without a copy, when TMA can address them: a unit-stride head dim, 16-byte aligned base and
    strides. Anything else is copied first. benchmarks/check_kernels_gpu.py runs every case both ways.
    """
    from .hopper_delta import launch_hopper_delta_attention
    from .triton_delta import tma_aligned

    def tma_ready(t: torch.Tensor) -> torch.Tensor:
        if t.stride(-1) == 1 and tma_aligned(t):
            return t
        t = t.contiguous()
        return t if tma_aligned(t) else t.clone()     # contiguous already, from a misaligned base

    for b in range(q.shape[0]):
        out_b = out[b:b + 1]
        run_out = out_b if out_b.stride(-1) == 1 else torch.empty(out_b.shape, device=out.device, dtype=out.dtype)
        launch_hopper_delta_attention(tma_ready(q[b:b + 1]), tma_ready(k[b:b + 1]), tma_ready(v[b:b + 1]),
                                      run_out, plan, scale, None if delta is None else delta[b:b + 1],
                                      block_n=tiles.block_n, stages=tiles.num_stages,
                                      dense_block_n=tiles.dense_block_n, dense_stages=tiles.dense_num_stages,
                                      **HOPPER_SCHEDULE)
        if run_out is not out_b:
            out_b.copy_(run_out)
    return out
