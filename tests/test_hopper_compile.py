"""The Hopper (Gluon) kernels compile for sm_90 with this machine's Triton, with the structure they claim.

No GPU here: kernels.hopper_offline runs Triton's compiler for an sm_90 target (through ptxas, to a cubin).
What runs on a GPU is checked there (benchmarks/check_kernels_gpu.py, bench_hopper.py) with the Triton the
dispatch requires (3.6); this catches a kernel edit that no longer compiles, under CI's Triton too. The
compiler runs in a subprocess: the test session runs Triton's interpreter (conftest.py), which compiles
nothing.
"""
import json
import os
import subprocess
import sys

import pytest

from deltapass.kernels.dispatch import HOPPER_SHARED_MEMORY
from deltapass.kernels import DeltaPlan
from deltapass.kernels.hopper_delta import (default_key_chunk, launch_hopper_delta_attention, loads_q_by_tma,
                                            shared_memory_bytes)

# (dense-rows launch, ping-pong, persistent_q, head dim, GQA group, dtype, block_n, stages): what dispatch.py runs
# (ping-pong and the persistent grid in the sparse launch only, 128-key tiles in 2 stages), and other head dims,
# groups, dtypes and tiles the Hopper path takes; a group that does not divide 128 keeps one CTA per item.
CASES = [(True, False, False, 128, 4, "bfloat16", 128, 2), (False, True, True, 128, 4, "bfloat16", 128, 2),
         (False, True, True, 64, 8, "float16", 128, 2), (False, False, True, 64, 3, "float16", 128, 2),
         (False, True, True, 128, 4, "bfloat16", 64, 3)]

COMPILE = """
import json, sys, torch
from deltapass.kernels.hopper_offline import compile_hopper_launch, ptxas_report
dense, pingpong, persistent_q, head_dim, group, dtype, block_n, stages = json.loads(sys.argv[1])
kernel = compile_hopper_launch(dense, pingpong, head_dim=head_dim, group=group, dtype=getattr(torch, dtype),
                               block_n=block_n, stages=stages, persistent_q=persistent_q)
ptx = kernel.asm["ptx"]
print(json.dumps({"cubin_bytes": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared,
                  "wgmma_serialized": ptxas_report(kernel)["wgmma_serialized"],
                  "wgmma": "wgmma.mma_async" in ptx, "tma_4d": "cp.async.bulk.tensor.4d" in ptx,
                  "turns": "bar.sync 8, 256" in ptx and "bar.arrive 9, 256" in ptx,
                  "grid_stride": "%nctaid.x" in ptx,
                  "hand_over": "red.release.gpu.global.max" in ptx and "ld.acquire.gpu.global" in ptx,
                  "item_counter": "atom.global.add.u32" in ptx}))
"""


@pytest.mark.parametrize("dense, pingpong, persistent_q, head_dim, group, dtype, block_n, stages", CASES)
def test_hopper_kernels_compile_for_sm90(dense, pingpong, persistent_q, head_dim, group, dtype, block_n, stages):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", COMPILE,
                          json.dumps([dense, pingpong, persistent_q, head_dim, group, dtype, block_n, stages])],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kernel = json.loads(run.stdout.strip().splitlines()[-1])
    assert kernel["cubin_bytes"] > 0, "no machine code"
    assert kernel["wgmma"], "the consumers' products are not asynchronous wgmma"
    # ptxas serializes every wgmma of a kernel when other instructions write a wgmma's inputs mid-pipeline
    # (its warning C7513): the kernel still runs, a quarter slower (experiment commit 7824bec).
    assert not kernel["wgmma_serialized"], "ptxas serialized the wgmma (C7513)"
    assert kernel["tma_4d"], "K/V do not come through 4-D TMA loads"
    # Ping-pong turns are named barriers 8 and 9 (hopper_delta._take_turn); without it there are none.
    assert kernel["turns"] == pingpong
    # The persistent sparse launch loops over work items by the grid's size (and takes Q by TMA, whose
    # box needs a group dividing 128); the dense launch takes its items from a counter instead, and the other
    # sparse launch is one CTA per item.
    persistent = persistent_q and not dense and loads_q_by_tma(group)
    assert kernel["grid_stride"] == persistent
    # The dense rows' key chunks hand their running state on behind a flag that one thread raises (release,
    # atomic max: a late store cannot lower it) and an acquire load.
    assert kernel["hand_over"] == dense
    # ... on a persistent grid that takes items from a counter, so that every wait ends.
    assert kernel["item_counter"] == dense
    # dispatch.py admits tiles by shared_memory_bytes: it must not undercount what the compiler allocates.
    q_buffers = 1 if dense else 2
    assert kernel["shared"] <= shared_memory_bytes(head_dim, block_n, stages, q_buffers) <= HOPPER_SHARED_MEMORY


@pytest.mark.parametrize("n_keys", [1, 4099, 32768, 131072, 262144, 1 << 20, 3 << 20])
@pytest.mark.parametrize("block_n", [64, 128])
def test_default_key_chunk_is_a_power_of_two_of_whole_tiles(n_keys, block_n):
    chunk = default_key_chunk(n_keys, block_n)
    assert 4096 <= chunk <= 32768 and chunk & (chunk - 1) == 0 and chunk % block_n == 0
    assert chunk == 32768 or n_keys < 8 * 2 * chunk      # about an eighth of the keys


@pytest.mark.parametrize("bad", [100, -128])
def test_a_key_chunk_of_partial_tiles_is_refused(bad):
    """The launcher names the argument before it launches anything (CPU tensors: nothing would run)."""
    import torch

    q, k, v = torch.empty(1, 4, 300, 64), torch.empty(1, 2, 300, 64), torch.empty(1, 2, 300, 64)
    with pytest.raises(ValueError, match=f"dense_key_chunk must be a positive multiple of dense_block_n=128, "
                                         f"got dense_key_chunk={bad}"):
        launch_hopper_delta_attention(q, k, v, torch.empty_like(q), DeltaPlan(300, 4, 16, 8, "delta"), 0.125,
                                      dense_key_chunk=bad)
