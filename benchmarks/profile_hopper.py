"""One call of the Hopper Δ kernels, for Nsight Compute: what limits each of the two launches.

    ncu --kernel-name regex:_ws_kernel --launch-skip 2 --launch-count 2 --set full \
        python benchmarks/profile_hopper.py [--n 131072] [--variant '{"pingpong": true, "persistent_q": true}']

The first call compiles and warms up (two launches: dense rows, sparse rows), the second is the one
to profile. Shape and config are bench_kernels.py's (Llama-3.1-8B attention, bf16, paper config).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from bench_kernels import GAMMA, SINK, WINDOW, inputs
from deltapass.kernels import DeltaPlan
from deltapass.kernels.dispatch import HOPPER_SCHEDULE
from deltapass.kernels.hopper_delta import launch_hopper_delta_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--correction", default="delta")
    ap.add_argument("--variant", default=json.dumps(dict(HOPPER_SCHEDULE)),
                    help="launcher keywords; the default is what dispatch.py passes")
    args = ap.parse_args()
    q, k, v = inputs(args.n)
    plan = DeltaPlan(args.n, SINK, WINDOW, GAMMA, args.correction)
    out = torch.empty_like(q)
    for _ in range(2):
        launch_hopper_delta_attention(q, k, v, out, plan, 1 / math.sqrt(q.shape[-1]), **json.loads(args.variant))
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
