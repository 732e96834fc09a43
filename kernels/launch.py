"""Launch parameters of the Δ kernels: the latency-only knobs the tuner may move."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and pipelining of both kernels (sparse rows, dense rows).

    block_m counts (query position, query head) pairs: the kernels pack the
    query heads that share one K/V head into the rows of a tile, so K/V tiles
    are loaded once per group. 0 means "pick the default for this shape".
    """

    block_m: int = 0
    block_n: int = 0
    num_warps: int = 0
    num_stages: int = 0
    dense_block_m: int = 0
    dense_block_n: int = 0
    dense_num_warps: int = 0
    dense_num_stages: int = 0
    kv_tma: int = 0  # K/V loads: 1 tensor descriptors (TMA), -1 plain pointers, 0 TMA where possible
    hopper: int = 0  # 1 the Hopper (sm_90) kernels, -1 the Triton kernels, 0 Hopper where they fit (dispatch.py)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"launch parameter {f.name} must be an int, got {value!r}")
            if f.name in ("kv_tma", "hopper"):
                if value not in (-1, 0, 1):
                    raise ValueError(f"launch parameter {f.name} must be -1, 0 or 1, got {value}")
                continue
            if value == 0:
                continue
            if f.name.endswith(("block_m", "block_n")) and (not _is_pow2(value) or not 16 <= value <= 256):
                raise ValueError(f"launch parameter {f.name} must be a power of two in [16, 256], got {value}")
            if f.name.endswith("num_warps") and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"launch parameter {f.name} must be 1, 2, 4, 8 or 16, got {value}")
            if f.name.endswith("num_stages") and not 1 <= value <= 8:
                raise ValueError(f"launch parameter {f.name} must be in 1..8, got {value}")

    @classmethod
    def from_kwargs(cls, launch: dict) -> "LaunchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(launch) - known)
        if unknown:
            raise TypeError(f"unknown launch parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**launch)

    def to_dict(self) -> dict:
        """{field name: value}: the keyword arguments of the deltapass ops (see launch_schema)."""
        return asdict(self)

    def resolved(self, head_dim: int, device: torch.device, hopper: bool = False) -> "LaunchConfig":
        """Fill zeros with defaults for this head dim and device (and for the Hopper kernels when `hopper`)."""
        base = HOPPER_DEFAULT if hopper else default_launch(head_dim, device)
        return LaunchConfig(**{f.name: getattr(self, f.name) or getattr(base, f.name) for f in fields(self)})


def launch_schema() -> str:
    """LaunchConfig's fields as keyword-only op schema arguments: "*, int block_m=0, ...".

    The ops take the launch parameters by name, so the schema follows the dataclass: a new field
    becomes a new keyword argument, never a shifted position.
    """
    for f in fields(LaunchConfig):
        assert f.type in (int, "int"), f"launch parameter {f.name} must be an int field, got {f.type!r}"
    return "*, " + ", ".join(f"int {f.name}={f.default}" for f in fields(LaunchConfig))


# The Hopper kernels (hopper_delta.py) read block_n and num_stages (and their dense_ twins) only: a CTA is
# always 128 (position, head) pairs in two consumer warpgroups and a producer warp. 128-key tiles in two
# stages were the fastest measured on an H200 (BENCHMARKS.md, "Hopper kernels").
HOPPER_DEFAULT = LaunchConfig(block_m=128, block_n=128, num_warps=4, num_stages=2, dense_block_m=128,
                              dense_block_n=128, dense_num_warps=4, dense_num_stages=2, kv_tma=1, hopper=1)


def default_launch(head_dim: int, device: torch.device) -> LaunchConfig:
    """Defaults measured on an H200; small tiles for the CPU interpreter.

    The CUDA defaults for head_dim <= 128 were the fastest variants of the launch sweep at 128K and 1M
    (BENCHMARKS.md, "Launch parameter and loop-structure sweeps"; benchmarks/results/launch_sweep_h200.json).
    Head dim 256 was not in that sweep; it takes smaller tiles and fewer stages, since its K/V tiles are
    twice as wide.
    """
    if device.type != "cuda":
        return LaunchConfig(64, 32, 4, 1, 64, 32, 4, 1)
    if head_dim > 128:
        return LaunchConfig(64, 32, 4, 2, 64, 32, 4, 2)
    return LaunchConfig(64, 64, 4, 3, 128, 128, 8, 3)
