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

Which rows are sample, tail or anchor rows and which keys a row keeps is the
rule's (rule.py): the launcher reads counts and flags from DeltaPlan, and the
kernels place rows and mask keys only through small jit helpers
(_tile_keep and the row helpers below), each checked against rule.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import LaunchConfig
from .rule import DeltaPlan

_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(X, batch, kv_head, start, stride_n, n_keys, offs_n, offs_d,
               KV_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of K or V from key `start` on; rows past the end read as zero or repeat."""
    if KV_TMA:
        tile = X.load([batch, kv_head, start, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        keys = tl.minimum(start + offs_n, n_keys - 1)       # masked scores ignore the repeats
        ptrs = X + keys.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _tile_keep(t, start, offs_n, in_a, a_hi, b_lo, b_hi, window):
    """rule.sparse_keep for rows t (a column) and the keys start + offs_n (a row) of a key tile of segment
    A = [0, a_hi) (in_a) or B = [b_lo, b_hi): one interval of keys per row, two compares per key.

    The segments make it one interval: A's keys are sinks (or, for dense rows, inside a window of all keys),
    so there a key counts iff it is causal; B's are not sinks, so there iff causal and in t's window.
    tests/test_kernels.py checks it against the rule over whole key loops.
    """
    lo = tl.where(in_a, 0, tl.maximum(b_lo, t - window + 1)) - start
    hi = tl.where(in_a, tl.minimum(a_hi, t + 1), tl.minimum(b_hi, t + 1)) - start
    return (offs_n >= lo) & (offs_n < hi)


@triton.jit
def _mask_scores(s, start, pos, in_a, a_hi, b_lo, b_hi, window, BLOCK_N: tl.constexpr):
    """Scores of the keys _tile_keep drops set to -inf."""
    keep = _tile_keep(pos[:, None], start, tl.arange(0, BLOCK_N)[None, :], in_a, a_hi, b_lo, b_hi, window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _online_softmax(acc, m_i, l_i, s, v, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one tile of raw scores s and values v into the running (acc, max, sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row with no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _sparse_segments(pmin, pmax, sink, window, BLOCK_N: tl.constexpr):
    """Key segments of rows pmin..pmax under sink + window: A = [0, a_hi) is whole for every row below
    a_full, B = [b_lo, b_hi) whole inside [b_full_lo, b_full_hi) (tile-aligned bounds)."""
    # A: sink keys; whole for every row below min(sink, pmin + 1).
    a_hi = tl.minimum(sink, pmax + 1)
    a_full = tl.minimum(sink, pmin + 1) // BLOCK_N * BLOCK_N
    # B: window keys (all >= sink); whole for every row in [pmax - window + 1, pmin].
    b_lo = tl.maximum(sink, pmin - window + 1)
    b_hi = pmax + 1
    b_full_lo = tl.cdiv(tl.maximum(pmax - window + 1, b_lo), BLOCK_N) * BLOCK_N
    b_full_hi = (pmin + 1) // BLOCK_N * BLOCK_N
    return a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi


@triton.jit
def _dense_segments(pmin, pmax, BLOCK_N: tl.constexpr):
    """Key segments of dense rows pmin..pmax (causal over every key): A = [0, pmax], whole below pmin's
    diagonal tile; B empty. Masked through _tile_keep with a window of all keys."""
    return pmax + 1, (pmin + 1) // BLOCK_N * BLOCK_N, 0, 0, 0, 0


@triton.jit
def _causal_chunk_segments(pmin, pmax, chunk_lo, chunk_keys, BLOCK_N: tl.constexpr):
    """Key segments of dense rows pmin..pmax (causal) over the key chunk [chunk_lo, chunk_lo + chunk_keys),
    chunk_lo a multiple of BLOCK_N: A empty; B = [chunk_lo, min(chunk end, pmax + 1)), whole below pmin's
    diagonal tile. Masked through _tile_keep with a window of all keys."""
    return 0, 0, chunk_lo, tl.minimum(chunk_lo + chunk_keys, pmax + 1), chunk_lo, (pmin + 1) // BLOCK_N * BLOCK_N


@triton.jit
def _key_tiles(a_hi, b_lo, b_hi, BLOCK_N: tl.constexpr):
    """(tiles of segment A, first tile start of segment B, tiles of both) for a loop over A then B."""
    n_a = tl.cdiv(a_hi, BLOCK_N)
    b_tile_lo = b_lo // BLOCK_N * BLOCK_N
    n_b = tl.where(b_hi > b_lo, tl.cdiv(b_hi - b_tile_lo, BLOCK_N), 0)
    return n_a, b_tile_lo, n_a + n_b


@triton.jit
def _key_tile(i, n_a, b_tile_lo, a_full, b_full_lo, b_full_hi, BLOCK_N: tl.constexpr):
    """(first key, in segment A, needs the mask) of key tile i of the loop _key_tiles counts."""
    in_a = i < n_a
    start = tl.where(in_a, i * BLOCK_N, b_tile_lo + (i - n_a) * BLOCK_N)
    edge = tl.where(in_a, start + BLOCK_N > a_full, (start < b_full_lo) | (start + BLOCK_N > b_full_hi))
    return start, in_a, edge


@triton.jit
def _attend(acc, m_i, l_i, q, K, V, batch, kv_head, stride_kn, stride_vn, n_keys, pos,
            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi, window, qk_scale,
            KV_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key segment A = [0, a_hi), then segment B = [b_lo, b_hi).

    Tiles of A that end by a_full and tiles of B inside [b_full_lo, b_full_hi) are seen whole by
    every row and skip the mask; elsewhere _tile_keep keeps the rule's keys of the tile's segment (for
    dense rows, A = [0, pmax] and a window of all keys). One loop covers both segments, with a uniform branch
    for the mask: on the H200 it was as fast as separate masked/whole loops for the sparse rows and
    4% faster for the dense rows (BENCHMARKS.md).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
    for i in range(0, n_tiles):
        start, in_a, edge = _key_tile(i, n_a, b_tile_lo, a_full, b_full_lo, b_full_hi, BLOCK_N)
        k = _load_tile(K, batch, kv_head, start, stride_kn, n_keys, offs_n, offs_d,
                       KV_TMA, HEAD_DIM, BLOCK_D, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if edge:
            s = _mask_scores(s, start, pos, in_a, a_hi, b_lo, b_hi, window, BLOCK_N)
        v = _load_tile(V, batch, kv_head, start, stride_vn, n_keys, offs_n, offs_d,
                       KV_TMA, HEAD_DIM, BLOCK_D, BLOCK_N)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, qk_scale, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _sparse_part(q, K, V, batch, kv_head, stride_kn, stride_vn, n_keys, pos, pmin, pmax,
                 sink, window, qk_scale,
                 KV_TMA: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sink + window attention of rows at positions pos (all within [pmin, pmax]); normalised."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(pmin, pmax, sink, window, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, batch, kv_head, stride_kn, stride_vn, n_keys, pos,
                            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi, window, qk_scale,
                            KV_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _dense_part(q, K, V, batch, kv_head, stride_kn, stride_vn, n_keys, pos, pmin, pmax, qk_scale,
                KV_TMA: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Causal attention of rows at positions pos over all keys <= pos; normalised."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _dense_segments(pmin, pmax, BLOCK_N)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, batch, kv_head, stride_kn, stride_vn, n_keys, pos,
                            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi, n_keys, qk_scale,
                            KV_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    return acc / l_i[:, None]


# ---- the rule's rows on the device: each helper mirrors one DeltaPlan member (tests/test_kernels.py checks it) ----

@triton.jit
def _sample_position(index, gamma, start):
    """DeltaPlan.dense_row_position of sample row number `index` (< n_samples): the chunk's first row `start`,
    then the multiples of gamma after it (index * gamma for a whole prompt)."""
    return tl.maximum((start // gamma + index) * gamma, start)


@triton.jit
def _dense_row_position(row, n_samples, gamma, start, tail_start):
    """DeltaPlan.dense_row_position: the sample rows first, then tail row tail_start + row - n_samples."""
    return tl.where(row < n_samples, _sample_position(row, gamma, start), tail_start + row - n_samples)


@triton.jit
def _dense_row_is_sample(row, n_samples):
    """DeltaPlan.is_sample_row(DeltaPlan.dense_row_position(row)): the sample rows come first."""
    return row < n_samples


@triton.jit
def _is_sample_row(pos, gamma, start):
    """DeltaPlan.is_sample_row for rows below s_p of a plan with sample rows (the sparse kernel's rows
    when DeltaPlan.sparse_kernel_skips_samples): there the first row and every multiple of gamma are."""
    return (pos % gamma == 0) | (pos == start)


@triton.jit
def _anchor_sample(pos, gamma, start):
    """DeltaPlan.anchor_sample: the row of the delta buffer (the anchor's sample index) row pos adds."""
    return pos // gamma - start // gamma


@triton.jit
def _row_ptrs(X, batch, head, pos, stride_b, stride_h, stride_n, offs_d):
    """Pointers to rows (head[m], pos[m]) of a [B, H, N, D] tensor: [BLOCK_M, BLOCK_D], 64-bit offsets."""
    return (X + batch.to(tl.int64) * stride_b + head.to(tl.int64)[:, None] * stride_h
            + pos.to(tl.int64)[:, None] * stride_n + offs_d[None, :])


@triton.jit
def _kv_sources(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, KV_TMA: tl.constexpr):
    """What _load_tile reads from: the [B, Hkv, N, D] descriptors, or this (batch, kv head)'s base pointers."""
    if KV_TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_src = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    return k_src, v_src


@triton.jit
def _dense_rows_kernel(Q, K, V, O, Delta,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                       stride_db, stride_dh, stride_dr,
                       n_keys, kv_heads, n_samples, n_dense, start, tail_start, gamma, sink, window, qk_scale,
                       GROUP: tl.constexpr, WITH_DELTA: tl.constexpr, KV_TMA: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    # Late rows cost the most: hand them out first so the last wave is short.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    pair = tile * BLOCK_M + tl.arange(0, BLOCK_M)          # (dense row, head in group) pairs
    valid = pair < n_dense * GROUP
    row = tl.minimum(pair // GROUP, n_dense - 1)
    head = kv_head * GROUP + pair % GROUP
    is_sample = _dense_row_is_sample(row, n_samples)
    pos = _dense_row_position(row, n_samples, gamma, start, tail_start)
    first_row = tl.minimum(tile * BLOCK_M // GROUP, n_dense - 1)
    last_row = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, n_dense - 1)
    pmin = _dense_row_position(first_row, n_samples, gamma, start, tail_start)
    pmax = _dense_row_position(last_row, n_samples, gamma, start, tail_start)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = _row_ptrs(Q, batch, head, pos - start, stride_qb, stride_qh, stride_qn, offs_d)
    q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
    k_src, v_src = _kv_sources(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, KV_TMA)

    dense = _dense_part(q, k_src, v_src, batch, kv_head, stride_kn, stride_vn, n_keys, pos, pmin, pmax,
                        qk_scale, KV_TMA, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    o_ptrs = _row_ptrs(O, batch, head, pos - start, stride_ob, stride_oh, stride_on, offs_d)
    tl.store(o_ptrs, dense.to(O.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])

    if WITH_DELTA:
        if _dense_row_is_sample(first_row, n_samples):
            d_ptrs = _row_ptrs(Delta, batch, head, tl.minimum(row, n_samples - 1), stride_db, stride_dh,
                               stride_dr, offs_d)
            d_mask = (valid & is_sample)[:, None] & d_ok[None, :]
            # Park dense in the delta buffer while the sparse pass reuses the registers.
            tl.store(d_ptrs, dense, mask=d_mask)
            sample_pmax = tl.minimum(pmax, _sample_position(n_samples - 1, gamma, start))
            sample_pos = tl.minimum(pos, sample_pmax)
            sparse = _sparse_part(q, k_src, v_src, batch, kv_head, stride_kn, stride_vn, n_keys, sample_pos,
                                  pmin, sample_pmax, sink, window, qk_scale,
                                  KV_TMA, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
            tl.debug_barrier()
            dense_again = tl.load(d_ptrs, mask=d_mask, other=0.0)
            tl.store(d_ptrs, dense_again - sparse, mask=d_mask)


@triton.jit
def _sparse_rows_kernel(Q, K, V, O, Delta,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                        stride_db, stride_dh, stride_dr,
                        n_keys, kv_heads, n_rows, start, gamma, sink, window, qk_scale,
                        GROUP: tl.constexpr, SKIP_SAMPLES: tl.constexpr, WITH_DELTA: tl.constexpr,
                        KV_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1) // kv_heads
    kv_head = tl.program_id(1) % kv_heads
    pair = tile * BLOCK_M + tl.arange(0, BLOCK_M)          # (query row, head in group) pairs
    valid = pair < n_rows * GROUP
    row = tl.minimum(pair // GROUP, n_rows - 1)            # q's and out's row; position start + row
    pos = start + row
    head = kv_head * GROUP + pair % GROUP
    pmin = start + tl.minimum(tile * BLOCK_M // GROUP, n_rows - 1)
    pmax = start + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, n_rows - 1)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = _row_ptrs(Q, batch, head, row, stride_qb, stride_qh, stride_qn, offs_d)
    q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
    k_src, v_src = _kv_sources(K, V, batch, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, KV_TMA)

    out = _sparse_part(q, k_src, v_src, batch, kv_head, stride_kn, stride_vn, n_keys, pos, pmin, pmax,
                       sink, window, qk_scale,
                       KV_TMA, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    store = valid
    if SKIP_SAMPLES:
        store = store & ~_is_sample_row(pos, gamma, start)    # the dense kernel wrote those
    if WITH_DELTA:
        d_ptrs = _row_ptrs(Delta, batch, head, _anchor_sample(pos, gamma, start), stride_db, stride_dh, stride_dr,
                           offs_d)
        out += tl.load(d_ptrs, mask=store[:, None] & d_ok[None, :], other=0.0)
    o_ptrs = _row_ptrs(O, batch, head, row, stride_ob, stride_oh, stride_on, offs_d)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=store[:, None] & d_ok[None, :])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def launch_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           plan: DeltaPlan, scale: float, launch: LaunchConfig,
                           delta: torch.Tensor | None = None) -> torch.Tensor:
    """Run both kernels into `out` (same shape/dtype as q). Inputs are validated by the caller.

    q, k, v and out need a unit stride on the head dim only; `delta` is the
    [B, Hq, n_samples, D] float32 workspace (allocated when not given). q and out hold the plan's rows
    (positions plan.start ..., q's row i at position plan.start + i); k and v its plan.n keys.
    """
    batch, q_heads, n_q, head_dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    assert (n, n_q) == (plan.n, plan.rows), f"q/k lengths {(n_q, n)} are not the plan's {(plan.rows, plan.n)}"
    group = q_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    qk_scale = scale * _LOG2E
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    with_delta = plan.carries_delta
    if with_delta and delta is None:
        delta = torch.empty(batch, q_heads, plan.n_samples, head_dim, device=q.device, dtype=torch.float32)
    delta_arg = delta if with_delta else out
    d_strides = _strides(delta_arg)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), *d_strides)

    use_tma = _use_tma(k, v, head_dim, launch.kv_tma)

    def kv_sources(block_n: int):
        if not use_tma:
            return k, v
        return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, block_d])
                     for t in (k, v))

    # Every row count, key set and sample flag below is read from the plan (see DeltaPlan).
    sink, window = plan.sparse_kernel_sink, plan.sparse_kernel_window
    n_dense = plan.dense_kernel_rows
    if n_dense > 0:
        grid = (triton.cdiv(n_dense * group, launch.dense_block_m), batch * kv_heads)
        _dense_rows_kernel[grid](
            q, *kv_sources(launch.dense_block_n), out, delta_arg, *common,
            n, kv_heads, plan.n_samples, n_dense, plan.start, plan.tail_start, plan.gamma, sink, window, qk_scale,
            GROUP=group, WITH_DELTA=with_delta, KV_TMA=use_tma, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=launch.dense_block_m, BLOCK_N=launch.dense_block_n, DOT_PRECISION=dot_precision,
            num_warps=launch.dense_num_warps, num_stages=launch.dense_num_stages)
    n_rows = plan.sparse_kernel_rows
    if n_rows > 0:
        grid = (triton.cdiv(n_rows * group, launch.block_m), batch * kv_heads)
        _sparse_rows_kernel[grid](
            q, *kv_sources(launch.block_n), out, delta_arg, *common,
            n, kv_heads, n_rows, plan.start, plan.gamma, sink, window, qk_scale,
            GROUP=group, SKIP_SAMPLES=plan.sparse_kernel_skips_samples, WITH_DELTA=with_delta,
            KV_TMA=use_tma,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
            DOT_PRECISION=dot_precision, num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out


def tma_aligned(t: torch.Tensor) -> bool:
    """A tensor descriptor (TMA) can address t: 16-byte aligned base and strides but the last."""
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])


def _use_tma(k: torch.Tensor, v: torch.Tensor, head_dim: int, kv_tma: int) -> bool:
    """Tensor-descriptor (TMA) K/V loads: need a power-of-two head dim and 16-byte aligned strides."""
    if kv_tma < 0:
        return False
    aligned = tma_aligned(k) and tma_aligned(v)
    capable = k.device.type == "cpu" or torch.cuda.get_device_capability(k.device)[0] >= 9
    possible = aligned and capable and head_dim & (head_dim - 1) == 0
    if kv_tma > 0 and not possible:
        raise ValueError(f"launch parameter kv_tma=1 needs a power-of-two head dim, 16-byte aligned K/V "
                         f"strides and compute capability >= 9; got head_dim={head_dim}, "
                         f"k.stride()={tuple(k.stride())}, device={k.device}")
    return possible


