"""Compile the Hopper kernels for sm_90 on a machine without a GPU; report what the compiler made of them.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0
    /tmp/t36/bin/pip install --no-deps -e . && /tmp/t36/bin/python benchmarks/compile_hopper_offline.py

For each kernel variant: shared memory, registers, spills and whether ptxas serialized the wgmma (ptxas -v
on Triton's PTX, sm_90a), and
instruction counts from the SASS (HGMMA = wgmma; LDL/STL = local-memory spills; UTMALDG = TMA loads).
Triton's own ptxas and cuobjdump do the work, so no CUDA toolkit is needed. The kernels are checked for
correctness and speed on the GPU only (benchmarks/bench_hopper.py, check_kernels_gpu.py); this is for
iterating on register pressure and schedules without spending device time.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import triton

from deltapass.kernels.hopper_offline import CUDA_TOOLS, compile_hopper_launch, ptxas_report
from record import header

SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "LDL", "STL", "MUFU.EX2")


def compiler_report(kernel) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(CUDA_TOOLS, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    return {"shared_bytes": kernel.metadata.shared, **ptxas_report(kernel),
            "sass": {op: len(re.findall(op, sass)) for op in SASS_OPS}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pingpong", choices=("off", "on", "both"), default="both",
                    help="consumers taking turns (dispatch.py: on for sparse rows, off for dense rows)")
    ap.add_argument("--persistent-q", choices=("off", "on", "both"), default="both",
                    help="the sparse launch's persistent grid with Q by TMA (dispatch.py: on)")
    ap.add_argument("--tiles", nargs="+", default=["128x2"], help="BLOCK_NxSTAGES of both launches (shipped: 128x2)")
    ap.add_argument("--out", help="write the reports as JSON here")
    args = ap.parse_args()
    if not triton.__version__.startswith("3.6."):
        raise SystemExit(f"the Hopper kernels are written for Triton 3.6's Gluon, this is Triton {triton.__version__}")
    choice = {"off": [False], "on": [True], "both": [False, True]}
    rows = []
    for tiles, pingpong, (dense, name) in itertools.product(args.tiles, choice[args.pingpong],
                                                            ((True, "dense rows"), (False, "sparse"))):
        block_n, stages = map(int, tiles.split("x"))
        for persistent_q in [False] if dense else choice[args.persistent_q]:
            report = compiler_report(compile_hopper_launch(dense, pingpong, block_n=block_n, stages=stages,
                                                           persistent_q=persistent_q))
            rows.append({"tiles": tiles, "pingpong": pingpong, "persistent_q": persistent_q, "kernel": name,
                         **report})
            flags = f"ping-pong {'on ' if pingpong else 'off'} persistent-q {'on ' if persistent_q else 'off'}"
            print(f"{tiles:>5} {flags} {name:<10} smem {report['shared_bytes']:>6} B  regs {report['registers']:>3}  "
                  f"spill {report['spill_stores']:>3}/{report['spill_loads']:<3} B  "
                  f"{'wgmma SERIALIZED  ' if report['wgmma_serialized'] else ''}{report['sass']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": header("cpu", target="sm_90"), "variants": rows}, f, indent=1)


if __name__ == "__main__":
    main()
