"""Triton kernels of Δ attention.

Two launches, in stream order:
  1. dense-rows kernel: for the sample rows (every gamma-th row below s_p) and
     the tail rows, exact causal attention, written straight to the output;
     for sample rows it also computes their sparse result and stores
     delta = dense - sparse (fp32, one row per gamma-block) in a small buffer.
  2. sparse kernel: sink + sliding-window attention for every other row below
     s_p; its epilogue adds the block's delta, so each output row is written once.

Both kernels tile (query position, query head) pairs: the Hq / Hkv query heads
that read one K/V head share a tile, so every K/V tile is loaded once for the
whole group (GQA read natively, no expanded copy), and a tile of block_m pairs
spans only block_m / group positions, which keeps the masked diagonal small.
Key tiles that every row of a tile sees in full run without masks; only the
edges (sink end, window start, diagonal) pay for the per-element mask.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import LaunchConfig
from .rule import DeltaPlan

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                  lo, hi, klo, khi, n_keys, sink, window, qk_scale,
                  MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key tiles [lo, hi) (lo a multiple of BLOCK_N).

    MASKED tiles keep key j for row t iff klo <= j < khi, j <= t and (j < sink or t - j < window);
    unmasked tiles must be fully visible to every row of the tile.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    kt_offs = offs_n[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]   # [BLOCK_N, BLOCK_D]
    # 64-bit start offsets: position * stride can pass 2**31 at long N; per-tile steps stay small.
    kt_ptrs = k_base + tl.cast(lo, tl.int64) * stride_kn + kt_offs
    v_ptrs = v_base + tl.cast(lo, tl.int64) * stride_vn + v_offs
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        if MASKED:
            in_range = keys < n_keys
            kt = tl.load(kt_ptrs, mask=in_range[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            j = keys[None, :]
            t = pos[:, None]
            keep = (j >= klo) & (j < khi) & (j <= t) & ((j < sink) | (t - j < window))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row with no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _sparse_part(q, k_base, v_base, stride_kn, stride_vn, offs_d, pos, pmin, pmax,
                 n_keys, sink, window, qk_scale,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sink + window attention of rows at positions pos (all within [pmin, pmax]); normalised."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Sink keys [0, min(sink, pmax + 1)): unmasked while every row sees them.
    sink_hi = tl.minimum(sink, pmax + 1)
    sink_full = tl.minimum(sink, pmin + 1) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  0, sink_full, 0, sink_hi, n_keys, sink, window, qk_scale,
                                  False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  sink_full, sink_hi, 0, sink_hi, n_keys, sink, window, qk_scale,
                                  True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    # Window keys [lo, hi), all >= sink: masked start, unmasked middle, masked diagonal.
    lo = tl.maximum(sink, pmin - window + 1)
    hi = pmax + 1
    tile_lo = lo // BLOCK_N * BLOCK_N
    hi_up = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(pmax - window + 1, lo), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, tile_lo), hi_up)
    full_hi = (pmin + 1) // BLOCK_N * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_up)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  tile_lo, full_lo, lo, hi, n_keys, sink, window, qk_scale,
                                  True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  full_lo, full_hi, lo, hi, n_keys, sink, window, qk_scale,
                                  False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  full_hi, hi, lo, hi, n_keys, sink, window, qk_scale,
                                  True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _dense_part(q, k_base, v_base, stride_kn, stride_vn, offs_d, pos, pmin, pmax, n_keys, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Causal attention of rows at positions pos over all keys <= pos; normalised."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full = (pmin + 1) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  0, full, 0, pmax + 1, n_keys, 0, n_keys, qk_scale,
                                  False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_d, pos,
                                  full, pmax + 1, 0, pmax + 1, n_keys, 0, n_keys, qk_scale,
                                  True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _dense_rows_kernel(Q, K, V, O, Delta,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_db, stride_dh, stride_dr,
                       n_keys, kv_heads, n_samples, n_dense, sparse_end, gamma, sink, window, qk_scale,
                       GROUP: tl.constexpr, WITH_DELTA: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    # Late rows cost the most: hand them out first so the last wave is short.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    pair = tile * BLOCK_M + tl.arange(0, BLOCK_M)          # (dense row, head in group) pairs
    valid = pair < n_dense * GROUP
    row = tl.minimum(pair // GROUP, n_dense - 1)
    head = kv_head * GROUP + pair % GROUP
    is_sample = row < n_samples
    pos = tl.where(is_sample, row * gamma, sparse_end + row - n_samples)
    first_row = tl.minimum(tile * BLOCK_M // GROUP, n_dense - 1)
    last_row = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, n_dense - 1)
    pmin = tl.where(first_row < n_samples, first_row * gamma, sparse_end + first_row - n_samples)
    pmax = tl.where(last_row < n_samples, last_row * gamma, sparse_end + last_row - n_samples)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
              + pos.to(tl.int64)[:, None] * stride_qn + offs_d[None, :])
    q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    dense = _dense_part(q, k_base, v_base, stride_kn, stride_vn, offs_d, pos, pmin, pmax, n_keys, qk_scale,
                        BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    o_ptrs = (O + batch.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + pos.to(tl.int64)[:, None] * stride_on + offs_d[None, :])
    tl.store(o_ptrs, dense.to(O.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])

    if WITH_DELTA:
        if first_row < n_samples:
            d_ptrs = (Delta + batch.to(tl.int64) * stride_db + head.to(tl.int64)[:, None] * stride_dh
                      + tl.minimum(row, n_samples - 1).to(tl.int64)[:, None] * stride_dr + offs_d[None, :])
            d_mask = (valid & is_sample)[:, None] & d_ok[None, :]
            # Park dense in the delta buffer while the sparse pass reuses the registers.
            tl.store(d_ptrs, dense, mask=d_mask)
            sample_pmax = tl.minimum(pmax, (n_samples - 1) * gamma)
            sample_pos = tl.minimum(pos, sample_pmax)
            sparse = _sparse_part(q, k_base, v_base, stride_kn, stride_vn, offs_d, sample_pos, pmin,
                                  sample_pmax, n_keys, sink, window, qk_scale,
                                  BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
            tl.debug_barrier()
            dense_again = tl.load(d_ptrs, mask=d_mask, other=0.0)
            tl.store(d_ptrs, dense_again - sparse, mask=d_mask)


@triton.jit
def _sparse_rows_kernel(Q, K, V, O, Delta,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_db, stride_dh, stride_dr,
                        n_keys, kv_heads, n_rows, gamma, sink, window, qk_scale,
                        GROUP: tl.constexpr, SKIP_SAMPLES: tl.constexpr, WITH_DELTA: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    pair = tile * BLOCK_M + tl.arange(0, BLOCK_M)          # (position, head in group) pairs
    valid = pair < n_rows * GROUP
    pos = tl.minimum(pair // GROUP, n_rows - 1)
    head = kv_head * GROUP + pair % GROUP
    pmin = tl.minimum(tile * BLOCK_M // GROUP, n_rows - 1)
    pmax = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, n_rows - 1)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
              + pos.to(tl.int64)[:, None] * stride_qn + offs_d[None, :])
    q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    out = _sparse_part(q, k_base, v_base, stride_kn, stride_vn, offs_d, pos, pmin, pmax,
                       n_keys, sink, window, qk_scale,
                       BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    store = valid
    if SKIP_SAMPLES:
        store = store & (pos % gamma != 0)                   # the dense kernel wrote those
    if WITH_DELTA:
        d_ptrs = (Delta + batch.to(tl.int64) * stride_db + head.to(tl.int64)[:, None] * stride_dh
                  + (pos // gamma).to(tl.int64)[:, None] * stride_dr + offs_d[None, :])
        out += tl.load(d_ptrs, mask=store[:, None] & d_ok[None, :], other=0.0)
    o_ptrs = (O + batch.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + pos.to(tl.int64)[:, None] * stride_on + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=store[:, None] & d_ok[None, :])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def launch_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           plan: DeltaPlan, scale: float, launch: LaunchConfig,
                           delta: torch.Tensor | None = None) -> torch.Tensor:
    """Run both kernels into `out` (same shape/dtype as q). Inputs are validated by the caller.

    q, k, v and out need a unit stride on the head dim only; `delta` is the
    [B, Hq, n_samples, D] float32 workspace (allocated when not given).
    """
    batch, q_heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    qk_scale = scale * _LOG2E
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    with_delta = plan.correction == "delta" and plan.n_samples > 0
    if with_delta and delta is None:
        delta = torch.empty(batch, q_heads, plan.n_samples, head_dim, device=q.device, dtype=torch.float32)
    delta_arg = delta if with_delta else out
    d_strides = _strides(delta_arg)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), *d_strides)

    # The exact case is the sparse kernel with the window covering every row.
    sink, window = (0, n) if plan.exact else (plan.sink, plan.window)
    n_dense = plan.n_dense_rows if not plan.exact else 0
    if n_dense > 0:
        grid = (triton.cdiv(n_dense * group, launch.dense_block_m), batch * kv_heads)
        _dense_rows_kernel[grid](
            q, k, v, out, delta_arg, *common,
            n, kv_heads, plan.n_samples, n_dense, plan.sparse_end, plan.gamma, sink, window, qk_scale,
            GROUP=group, WITH_DELTA=with_delta, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=launch.dense_block_m, BLOCK_N=launch.dense_block_n, DOT_PRECISION=dot_precision,
            num_warps=launch.dense_num_warps, num_stages=launch.dense_num_stages)
    n_rows = n if plan.exact else plan.sparse_end
    if n_rows > 0:
        grid = (triton.cdiv(n_rows * group, launch.block_m), batch * kv_heads)
        _sparse_rows_kernel[grid](
            q, k, v, out, delta_arg, *common,
            n, kv_heads, n_rows, plan.gamma, sink, window, qk_scale,
            GROUP=group, SKIP_SAMPLES=plan.n_samples > 0, WITH_DELTA=with_delta,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            DOT_PRECISION=dot_precision, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
