"""Compile the Hopper (sm_90) kernels on a machine without a GPU: what the compiler makes of them.

For the tests (the Gluon source compiles, with the structure it claims, and ptxas keeps its wgmma
asynchronous) and for benchmarks/compile_hopper_offline.py (registers, spills, SASS). It uses Triton's
compile entry points below the launcher (the binder of a jit function, GluonASTSource), which are not a
public API: a Triton release may move them, and the CI test that calls this then says so.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.backends.nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler.compiler import ASTSource, make_backend
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
from triton.runtime.jit import create_function_from_signature

from . import hopper_delta

SM90 = GPUTarget("cuda", 90, 32)
# Triton's own CUDA tools (cuobjdump; ptxas is the one Triton compiles sm_90 with), so no CUDA toolkit is needed.
CUDA_TOOLS = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin")


def compile_for_sm90(fn, *args, **kwargs):
    """What `fn[grid](*args, **kwargs)` would compile on an sm_90 GPU, built without one."""
    backend = make_backend(SM90)
    fn.ASTSource = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs.setdefault("debug", False)
    kwargs.setdefault("instrumentation_mode", "")
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(fn.ASTSource(fn, signature, constexprs, attrs), target=SM90, options=options.__dict__)


def compile_hopper_launch(dense: bool, pingpong: bool, head_dim: int = 128, group: int = 4, block_n: int = 128,
                          stages: int = 2, dtype: torch.dtype = torch.bfloat16, persistent_q: bool = False):
    """One launch (dense rows or sparse rows, with delta) of an 8-KV-head shape at 4K, as the launcher passes
    it; sequence length and config are runtime arguments, so they do not change the code."""
    n, kv_heads = 4096, 8
    q = torch.empty(1, kv_heads * group, n, head_dim, dtype=dtype)
    k, v = (torch.empty(1, kv_heads, n, head_dim, dtype=dtype) for _ in range(2))
    out, delta = torch.empty_like(q), torch.empty(1, kv_heads * group, 64, head_dim)
    q_tma = persistent_q and not dense and hopper_delta.loads_q_by_tma(group)
    descs = hopper_delta.tma_descriptors(q, k, v, block_n, q_tma)
    strides = (*q.stride()[:3], *out.stride()[:3], *delta.stride()[:3])
    mode = hopper_delta.DENSE if dense else hopper_delta.SPARSE
    running = hopper_delta.running_state(1, head_dim, q.device)
    return compile_for_sm90(hopper_delta._ws_kernel, q, out, delta, *descs, *running, *strides, n, kv_heads, n, 64,
                            64, n - 192, 1024, 2048, 0.1, 4096, 1024, MODE=mode, GROUP=group, WITH_DELTA=True,
                            HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages, PINGPONG=pingpong, Q_TMA=q_tma,
                            PRODUCER_REGS=24, CONSUMER_REGS=240, num_warps=4)


def ptxas_report(kernel) -> dict:
    """ptxas -v (the one Triton uses for sm_90) on the kernel's PTX for sm_90a: registers, spill bytes, and
    whether ptxas serialized the wgmma (its warning C7513, which cost an experiment 26-29%: commit 7824bec)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log)[1]), "spill_stores": int(spills[1]),
            "spill_loads": int(spills[2]), "wgmma_serialized": "C7513" in log}
