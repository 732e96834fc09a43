"""Hopper (sm_90) Δ kernels in Gluon: warp-specialized, TMA-fed, asynchronous wgmma.

The same two launches as triton_delta.py (dense rows first, then sparse rows with the delta
added in the epilogue), on the FlashAttention-3 schedule:
  * a producer warp streams K and V tiles with TMA into a ring of shared-memory stages,
    each stage guarded by a "ready" and an "empty" mbarrier;
  * two consumer warpgroups each own 64 (query position, query head) pairs of the CTA's 128
    and run QK^T and PV as asynchronous wgmma, so one warpgroup's softmax overlaps the other's
    matrix products; both read every K/V stage the producer fills once;
  * each consumer issues tile i's QK^T before tile i-1's PV, so its own softmax overlaps its
    tensor-core work (FA3's intra-warpgroup overlap);
  * with PINGPONG (the sparse-rows launch in dispatch.py) the two consumers take turns issuing
    their products, on named barriers: 1-2% faster there, slower for dense rows;
  * with Q_TMA (the sparse-rows launch, GQA groups dividing 128) the grid is persistent, one CTA per
    multiprocessor looping over work items, and the producer loads each item's Q by TMA into one of
    two buffers, so the next item's Q and first K/V tiles arrive while the consumers finish the
    current one (a sparse CTA sees only ~25 key tiles, so its start and end cost 12% of its time).
  * the dense-rows launch splits each row tile's keys into chunks (default_key_chunk: 16384 keys at
    128K, 32768 from 256K on), one work item per (chunk, head, tile), chunk by chunk, on a persistent
    grid whose producers take items from a counter: the CTAs running together read the same keys (L2
    hits), and the last wave is no longer one whole-row CTA per multiprocessor. A tile's chunks hand
    their running output, max and sum on through global memory, in order, behind a flag per (tile,
    warpgroup). Against whole-row items in one run (revision 6): dense rows 11% faster at 1M, 5% at
    128K.
Otherwise one CTA per work item. Schedules measured slower on an H200 and removed (BENCHMARKS.md,
"Hopper kernels", and the commits that measured them): no overlap inside a warpgroup, a persistent
grid whose consumers load Q themselves, mbarrier turns, rescaling under the next QK^T, one pass for the
sample rows, banded dense-row order, a direct epilogue, three stages, dense-row CTAs in pairs (one
tile's keys forward, the other's in reverse), an epilogue storing O by asynchronous TMA stores, sparse
items run as one stream of key tiles (flat_items).

Rows, key segments and masks are the rule's (rule.py), through the jit helpers of triton_delta.py
(Gluon calls them as they are): this file imports them, it does not restate them. Without Q_TMA,
query rows are loaded with plain loads, position-major (a tile packs the query heads of one K/V head,
which no TMA box describes for every group size); with it, a 4-D box [1, GROUP, 128 / GROUP, D] holds
them head-major. K and V go through 4-D tensor descriptors, whose out-of-range rows TMA fills with
zeros.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .launch import HOPPER_DEFAULT
from .rule import DeltaPlan
# The rule's rows and keys on the device, and the key-tile loop over its two segments: one statement each,
# in triton_delta.py (tests/test_kernels.py checks the rule's helpers against rule.py); Gluon calls them as is.
from .triton_delta import (_anchor_sample, _causal_chunk_segments, _dense_row_is_sample, _dense_row_position,
                           _is_sample_row, _key_tile, _key_tiles, _sample_position, _sparse_segments, _tile_keep)

_LOG2E = 1.4426950408889634
# Names later Triton releases changed (their name first, 3.6's second): a barrier of the calling partition's
# threads, and the TMA load of a tile into shared memory. The GPU checks ran 3.6 (dispatch.py requires it);
# CI compiles the kernels with its own Triton (tests/test_hopper_compile.py).
_partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
WG_M = gl.constexpr(64)             # (position, head) pairs per consumer warpgroup: one wgmma M
CONSUMERS = gl.constexpr(2)         # consumer warpgroups per CTA
CTA_M = gl.constexpr(128)           # WG_M * CONSUMERS
SPARSE = gl.constexpr(0)            # MODE: which launch of the pair
DENSE = gl.constexpr(1)


# ---- which rows and keys a CTA covers ----

@gluon.jit
def _cta_bounds(tile, MODE: gl.constexpr, GROUP: gl.constexpr, n_rows, n_samples, gamma, sparse_end):
    """(first position, last position, first row) of the CTA's 128 pairs; rows past the end repeat the last."""
    first = gl.minimum(tile * CTA_M // GROUP, n_rows - 1)
    last = gl.minimum((tile * CTA_M + CTA_M - 1) // GROUP, n_rows - 1)
    if MODE == DENSE:
        pmin = _dense_row_position(first, n_samples, gamma, 0, sparse_end)
        pmax = _dense_row_position(last, n_samples, gamma, 0, sparse_end)
    else:
        pmin = first
        pmax = last
    return pmin, pmax, first


# ---- producer: one warp issuing TMA loads ----

@gluon.jit
def _load_pass(k_desc, v_desc, k_bufs, v_bufs, bars, batch, kv_head, it, a_hi, b_lo, b_hi,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    k_ready, k_empty, v_ready, v_empty = bars
    n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
    for i in range(n_tiles):
        start, in_a, edge = _key_tile(i, n_a, b_tile_lo, 0, 0, 0, BLOCK_N)
        stage = it % STAGES
        phase = (it // STAGES) & 1
        # A fresh mbarrier counts as having completed the phase before 0: the first round passes.
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [batch, kv_head, start, 0], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [batch, kv_head, start, 0], v_ready.index(stage), v_bufs.index(stage))
        it += 1
    return it


@gluon.jit
def _produce_item(args, item, it, MODE: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    tile, batch, kv_head, chunk = _work_item(MODE, item, n_items, n_rows, kv_heads, n_keys, key_chunk, GROUP)
    pmin, pmax, first_row = _cta_bounds(tile, MODE, GROUP, n_rows, n_samples, gamma, sparse_end)
    if MODE == DENSE:
        chunk_lo, holds_keys, last = _chunk_span(chunk, key_chunk, pmax)
        if holds_keys:     # else the tile's rows end before the chunk: an empty item
            a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _causal_chunk_segments(pmin, pmax, chunk_lo, key_chunk,
                                                                                    BLOCK_N)
            it = _load_pass(k_desc, v_desc, k_bufs, v_bufs, bars, batch, kv_head, it, a_hi, b_lo, b_hi, BLOCK_N,
                            STAGES)
            if WITH_DELTA:
                # The tile's last chunk, if it holds sample rows: their sparse part follows.
                if (first_row < n_samples) & last:
                    a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(
                        pmin, gl.minimum(pmax, _sample_position(n_samples - 1, gamma, 0)), sink, window, BLOCK_N)
                    it = _load_pass(k_desc, v_desc, k_bufs, v_bufs, bars, batch, kv_head, it, a_hi, b_lo, b_hi,
                                    BLOCK_N, STAGES)
    else:
        a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(pmin, pmax, sink, window, BLOCK_N)
        it = _load_pass(k_desc, v_desc, k_bufs, v_bufs, bars, batch, kv_head, it, a_hi, b_lo, b_hi, BLOCK_N, STAGES)
    return it


@gluon.jit
def _my_items(args):
    """Q_TMA's persistent grid: (first, end, step) of the work items this CTA takes."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    return gl.program_id(0), n_items, gl.num_programs(0)


@gluon.jit
def _load_q(args, item, i, MODE: gl.constexpr, GROUP: gl.constexpr):
    """Q_TMA: the item's 128 query rows (GROUP heads x 128 / GROUP positions) into Q buffer i % 2."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    q_desc, q_ready, q_empty = q_tma
    tile, batch, kv_head, chunk = _work_item(MODE, item, n_items, n_rows, kv_heads, n_keys, key_chunk, GROUP)
    buf = i % 2
    mbarrier.wait(q_empty.index(buf), ((i // 2) & 1) ^ 1)
    mbarrier.expect(q_ready.index(buf), q_desc.block_type.nbytes)
    _tma_load(q_desc, [batch, kv_head * GROUP, tile * (CTA_M // GROUP), 0], q_ready.index(buf), q_bufs.index(buf))


@gluon.jit
def _n_items(args):
    """The launch's number of work items; the counter hands out "stop" from there on."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    return n_items


@gluon.jit
def _take_item(args, i):
    """Producer (one warp): take the launch's next work item from its counter (lane 0's atomic, broadcast to
    the warp) and hand it to the consumers in slot i % 2. Items at or past n_items mean "stop"."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    run_acc, run_ml, flags, counter, item_ids, item_ready, item_empty = running
    lanes: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    taken = gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 v; .reg .u32 lane; mov.u32 lane, %laneid; setp.eq.u32 p, lane, 0; "
        "mov.b32 v, 0; @p atom.global.add.u32 v, [$1], 1; shfl.sync.idx.b32 $0, v, 0, 0x1f, 0xffffffff; }",
        "=r,l", [counter + gl.zeros([32], gl.int32, lanes)], dtype=gl.int32, is_pure=False, pack=1)
    slot = i % 2
    mbarrier.wait(item_empty.index(slot), ((i // 2) & 1) ^ 1)   # both consumers read the slot's last item
    item_ids.index(slot).store(taken)
    _partition_barrier()    # every lane's copy is in shared memory before the arrival
    mbarrier.arrive(item_ready.index(slot), count=1)
    return gl.max(taken, 0)


@gluon.jit
def _read_item(args, i):
    """Consumer: the work item the producer handed over in slot i % 2."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    run_acc, run_ml, flags, counter, item_ids, item_ready, item_empty = running
    slot = i % 2
    mbarrier.wait(item_ready.index(slot), (i // 2) & 1)
    item = gl.max(item_ids.index(slot).load(gl.BlockedLayout([1], [32], [4], [0])), 0)
    _partition_barrier()    # every warp has read the slot
    mbarrier.arrive(item_empty.index(slot), count=1)
    return item


@gluon.jit
def _producer(args, wg: gl.constexpr, MODE: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_TMA: gl.constexpr):
    if Q_TMA:
        # Persistent: the CTA's items one after another; Q and K/V of the next item load while the
        # consumers finish the current one.
        first, end, step = _my_items(args)
        it = gl.to_tensor(0)
        for item in range(first, end, step):
            _load_q(args, item, (item - first) // step, MODE, GROUP)
            it = _produce_item(args, item, it, MODE, GROUP, WITH_DELTA, BLOCK_N, STAGES)
    elif MODE == DENSE:
        # Persistent: items in the counter's order, each taken once the previous one's loads are issued.
        i = gl.to_tensor(0)
        it = gl.to_tensor(0)
        item = _take_item(args, i)
        while item < _n_items(args):
            it = _produce_item(args, item, it, MODE, GROUP, WITH_DELTA, BLOCK_N, STAGES)
            i += 1
            item = _take_item(args, i)
    else:
        _produce_item(args, gl.program_id(0), gl.to_tensor(0), MODE, GROUP, WITH_DELTA, BLOCK_N, STAGES)


@gluon.jit
def _work_item(MODE: gl.constexpr, item, n_items, n_rows, kv_heads, n_keys, key_chunk, GROUP: gl.constexpr):
    """(row tile, batch, kv head, key chunk) of work item `item`.

    Dense rows: one item per (key chunk, head, row tile), chunk by chunk (every head's tiles over keys
    [0, key_chunk), then over the next chunk, ...): the CTAs running together read the same keys of one or
    two heads (L2 hits), and no item is longer than a chunk (the last wave ends evenly). Within a chunk,
    one head's tiles in a row, latest rows first; items past a tile's last row are empty. A tile's chunks
    run in order, each folding in the running state the previous one left (_consume_dense_item).
    Sparse rows: one head's tiles in a row, so CTAs running together share K/V windows in L2; chunk 0.
    """
    n_tiles = gl.cdiv(n_rows * GROUP, CTA_M)
    if MODE == DENSE:
        per_chunk = n_items // gl.cdiv(n_keys, key_chunk)     # batch * kv_heads * n_tiles
        chunk = item // per_chunk
        tile = n_tiles - 1 - item % n_tiles
        bh = item % per_chunk // n_tiles
    else:
        chunk = 0
        tile = item % n_tiles
        bh = item // n_tiles
    return tile, bh // kv_heads, bh % kv_heads, chunk


@gluon.jit
def _chunk_span(chunk, key_chunk, pmax):
    """(first key, holds keys, is the tile's last) of a dense item's key chunk for rows up to pmax. The
    producer and both consumers take their loads, hand-overs and the sample rows' sparse pass from it."""
    chunk_lo = chunk * key_chunk
    return chunk_lo, chunk_lo <= pmax, chunk_lo + key_chunk > pmax


# ---- consumers: two warpgroups of attention ----

@gluon.jit
def _scores_to_probs(s, m_i, l_i, i, n_a, b_tile_lo, t, offs_n, a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi,
                     window, qk_scale, BLOCK_N: gl.constexpr):
    """Mask tile i's raw scores where needed and fold them into the running max and sum.

    Returns the unnormalised probabilities, the factor that rescales the running output, max and sum.
    """
    start, in_a, edge = _key_tile(i, n_a, b_tile_lo, a_full, b_full_lo, b_full_hi, BLOCK_N)
    if edge:
        # The rule's keys for the tile's segment (dense rows: a window of all keys).
        s = gl.where(_tile_keep(t, start, offs_n, in_a, a_hi, b_lo, b_hi, window), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    # A row with no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_ref[:, None])
    alpha = gl.exp2(m_i - m_ref)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


# PINGPONG turns are two named barriers of 256 threads (both consumers): the warpgroup whose turn it is
# waits on its own (bar.sync), the other arrives on it without waiting (bar.arrive). Triton's own
# partitions use barriers 0-2; turns take 8 (warpgroup 0's) and 9 (warpgroup 1's).
@gluon.jit
def _bar(asm: gl.constexpr):
    """Run one barrier instruction once per thread of a 4-warp partition (inline asm is per element)."""
    one_per_thread = gl.full([128], 0, gl.int32, gl.BlockedLayout([1], [32], [4], [0]))
    gl.inline_asm_elementwise(asm + " mov.b32 $0, $1;", "=r,r", [one_per_thread], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _turn(op: gl.constexpr, of_wg: gl.constexpr):
    """`op` ("bar.sync" waits, "bar.arrive" does not) on the barrier of warpgroup of_wg's turn (8 + of_wg)."""
    if of_wg == 0:
        _bar(op + " 8, 256;")
    else:
        _bar(op + " 9, 256;")


@gluon.jit
def _take_turn(wg: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: wait until the other warpgroup has issued its matrix products."""
    if PINGPONG:
        _turn("bar.sync", wg)


@gluon.jit
def _pass_turn(wg: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: this warpgroup's products are issued; the other may issue its own."""
    if PINGPONG:
        _turn("bar.arrive", 1 - wg)


@gluon.jit
def _first_turn(wg: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG, before the work item: warpgroup 0 goes first."""
    if PINGPONG and wg == 1:
        _turn("bar.arrive", 0)


@gluon.jit
def _last_turn(wg: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG, after the work item: warpgroup 0 takes the turn warpgroup 1's last products passed it, so
    both barriers end with as many arrivals as waits (an arrival never laps a wait: each warpgroup waits
    for the other's arrival between two of its own)."""
    if PINGPONG and wg == 0:
        _turn("bar.sync", 0)


@gluon.jit
def _kv_tile(bufs, stage):
    """Stage `stage` of a K or V ring as the [BLOCK_N, HEAD_DIM] operand wgmma reads."""
    return bufs.index(stage).reshape([bufs.shape[3], bufs.shape[4]])


@gluon.jit
def _attend_pass(acc, m_i, l_i, it, wg: gl.constexpr, q_smem, k_bufs, v_bufs, bars, pos, a_hi, a_full, b_lo,
                 b_hi, b_full_lo, b_full_hi, window, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    """Online softmax of this warpgroup's rows over the pass's key tiles, in the producer's order.

    it counts K/V tiles (the ring's stage and phase). Tile i's QK^T is issued before tile i-1's PV and
    tile i's softmax runs while that PV is in flight; the running output is rescaled once PV has landed.
    With PINGPONG a warpgroup issues its products only in its turn, so one warpgroup's softmax runs
    under the other's products.
    """
    k_ready, k_empty, v_ready, v_empty = bars
    n_a, b_tile_lo, n_tiles = _key_tiles(a_hi, b_lo, b_hi, BLOCK_N)
    t = pos[:, None]
    offs_n = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))[None, :]
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    # Tile 0: scores and probabilities only.
    stage = it % STAGES
    mbarrier.wait(k_ready.index(stage), (it // STAGES) & 1)
    _take_turn(wg, PINGPONG)
    s = warpgroup_mma(q_smem, _kv_tile(k_bufs, stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(wg, PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, alpha, m_i, l_i = _scores_to_probs(s, m_i, l_i, 0, n_a, b_tile_lo, t, offs_n, a_hi, a_full, b_lo, b_hi,
                                          b_full_lo, b_full_hi, window, qk_scale, BLOCK_N)
    acc = acc * gl.convert_layout(alpha, o_row)[:, None]
    p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    for i in range(1, n_tiles):
        prev = it % STAGES
        prev_phase = (it // STAGES) & 1
        it += 1
        stage = it % STAGES
        mbarrier.wait(k_ready.index(stage), (it // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), prev_phase)
        _take_turn(wg, PINGPONG)
        s = warpgroup_mma(q_smem, _kv_tile(k_bufs, stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, _kv_tile(v_bufs, prev), acc, is_async=True)
        _pass_turn(wg, PINGPONG)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))        # QK^T of tile i landed; PV may not have
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, alpha, m_i, l_i = _scores_to_probs(s, m_i, l_i, i, n_a, b_tile_lo, t, offs_n, a_hi, a_full, b_lo,
                                              b_hi, b_full_lo, b_full_hi, window, qk_scale, BLOCK_N)
        p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, o_row)[:, None]
    stage = it % STAGES
    mbarrier.wait(v_ready.index(stage), (it // STAGES) & 1)
    _take_turn(wg, PINGPONG)
    acc = warpgroup_mma(p_op, _kv_tile(v_bufs, stage), acc, is_async=True)
    _pass_turn(wg, PINGPONG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(v_empty.index(stage), count=1)
    it += 1
    return acc, m_i, l_i, it


@gluon.jit
def _normalised(acc, l_i, io_layout: gl.constexpr):
    return gl.convert_layout(acc / gl.convert_layout(l_i, gl.SliceLayout(1, acc.type.layout))[:, None], io_layout)


@gluon.jit
def _stage_q(Q, q_bufs, wg: gl.constexpr, batch, head, pos, stride_qb, stride_qh, stride_qn, offs_d):
    """Without Q_TMA: this warpgroup's query rows (head, pos) into its Q buffer, ready for wgmma."""
    q_rows = (Q + batch.to(gl.int64) * stride_qb + head.to(gl.int64)[:, None] * stride_qh
              + pos.to(gl.int64)[:, None] * stride_qn)
    q_smem = q_bufs.index(wg)
    q_tile = gl.load(q_rows + offs_d)
    _partition_barrier()    # a previous item's wgmma reads of q_smem are done in every warp
    q_smem.store(q_tile)
    fence_async_shared()
    _partition_barrier()    # every warp's rows are in shared memory before the warpgroup's wgmma reads them
    return q_smem


@gluon.jit
def _consume_item(args, item, i, it, wg: gl.constexpr, MODE: gl.constexpr, GROUP: gl.constexpr,
                  WITH_DELTA: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  PINGPONG: gl.constexpr, Q_TMA: gl.constexpr):
    """One work item: this warpgroup's 64 rows of the item's 128, from loading Q to storing the output."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    # Row tiles for global loads and stores: 16 bytes a thread, a row's threads side by side.
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    if MODE == DENSE:
        it = _consume_dense_item(args, item, it, wg, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG,
                                 s_layout, o_layout, io_layout)
    else:
        it = _consume_sparse_item(args, item, i, it, wg, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG,
                                  Q_TMA, s_layout, o_layout, io_layout)
    return it


@gluon.jit
def _consume_sparse_item(args, item, i, it, wg: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr,
                         HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         PINGPONG: gl.constexpr, Q_TMA: gl.constexpr, s_layout: gl.constexpr,
                         o_layout: gl.constexpr, io_layout: gl.constexpr):
    """Sparse rows: attention over the rule's sink and window, plus the anchor's delta; sample rows skipped."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    (stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dr) = strides
    tile, batch, kv_head, chunk = _work_item(SPARSE, item, n_items, n_rows, kv_heads, n_keys, key_chunk, GROUP)
    pmin, pmax, first_row = _cta_bounds(tile, SPARSE, GROUP, n_rows, n_samples, gamma, sparse_end)
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, io_layout))[None, :]
    r = wg * WG_M + gl.arange(0, WG_M, gl.SliceLayout(1, io_layout))
    if Q_TMA:
        # The producer's Q box holds the item's rows head by head: row r is head r // P, position r % P.
        P: gl.constexpr = CTA_M // GROUP
        q_desc, q_ready, q_empty = q_tma
        valid = tile * P + r % P < n_rows
        pos = gl.minimum(tile * P + r % P, n_rows - 1)
        head = kv_head * GROUP + r // P
        mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
        q_smem = q_bufs.index(i % 2).reshape([CTA_M, HEAD_DIM]).slice(wg * WG_M, WG_M)
    else:
        # This warpgroup's 64 (position, head) pairs, in the row layout (loads, stores); rows past the end repeat.
        pair = tile * CTA_M + r
        valid = pair < n_rows * GROUP
        pos = gl.minimum(pair // GROUP, n_rows - 1)
        head = kv_head * GROUP + pair % GROUP
        q_smem = _stage_q(Q, q_bufs, wg, batch, head, pos, stride_qb, stride_qh, stride_qn, offs_d)

    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([WG_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_M], gl.float32, gl.SliceLayout(1, s_layout))
    a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _sparse_segments(pmin, pmax, sink, window, BLOCK_N)
    acc, m_i, l_i, it = _attend_pass(acc, m_i, l_i, it, wg, q_smem, k_bufs, v_bufs, bars,
                                     gl.convert_layout(pos, gl.SliceLayout(1, s_layout)), a_hi, a_full, b_lo, b_hi,
                                     b_full_lo, b_full_hi, window, qk_scale, s_layout, BLOCK_N, STAGES, PINGPONG)
    if Q_TMA:
        q_desc, q_ready, q_empty = q_tma
        mbarrier.arrive(q_empty.index(i % 2), count=1)     # this warpgroup is done with the Q buffer
    out = _normalised(acc, l_i, io_layout)

    store = valid
    if n_samples > 0:
        store = store & ~_is_sample_row(pos, gamma, 0)     # the dense-rows launch wrote the sample rows
    if WITH_DELTA:
        d_rows = (Delta + batch.to(gl.int64) * stride_db + head.to(gl.int64)[:, None] * stride_dh
                  + _anchor_sample(pos, gamma, 0).to(gl.int64)[:, None] * stride_dr)
        out += gl.load(d_rows + offs_d, mask=store[:, None], other=0.0)
    o_rows = (O + batch.to(gl.int64) * stride_ob + head.to(gl.int64)[:, None] * stride_oh
              + pos.to(gl.int64)[:, None] * stride_on)
    gl.store(o_rows + offs_d, out.to(O.dtype.element_ty), mask=store[:, None])
    return it


# A dense tile's key chunks hand their running state (unnormalised output, max, sum) on through global
# memory, one flag per (tile, warpgroup) counting the chunks folded in. The item of chunk c waits for the
# flag to reach c, set by the item of chunk c - 1, whose index is lower (items run chunk by chunk). Every
# wait ends because CTAs take items from one counter in increasing order and finish them in the order they
# took them: the lowest unfinished item is held by a running CTA, and the item it waits for is lower, so
# finished. A writer: every thread's stores, a fence, the warpgroup's barrier, then one thread raises the
# flag (release, atomic max). A reader: every thread's acquire load of the flag before its loads.
# The flag is raised by one thread and never lowered: when every thread stored it, a straggler's store of
# c could land after chunk c had already seen it and raised it to c + 1, putting it back; chunks of one or
# two key tiles are short enough for that, and the launch hung (benchmarks/results/hopper/key_chunk_hang).

@gluon.jit
def _wait_flag(flag, value, row_layout: gl.constexpr):
    """Spin (every thread, acquire at GPU scope) until *flag >= value. The warp loops until all its threads
    have seen it, so it leaves converged (the barriers and wgmma after it need whole warps). Returns zeros
    in row_layout that the caller adds to its addresses, so its loads cannot move above the wait."""
    seen = gl.inline_asm_elementwise(
        "{ .reg .pred p, q; WAIT_FLAG: ld.acquire.gpu.global.b32 $0, [$1]; setp.lt.s32 p, $0, $2; "
        "vote.sync.any.pred q, p, 0xffffffff; @q bra WAIT_FLAG; }",
        "=r,l,r", [flag + gl.zeros([WG_M], gl.int32, row_layout), gl.zeros([WG_M], gl.int32, row_layout) + value],
        dtype=gl.int32, is_pure=False, pack=1)
    return gl.minimum(seen - value, 0)


@gluon.jit
def _release_flag(flag, value, row_layout: gl.constexpr):
    """After this warpgroup's stores of the running state: raise *flag to value, once every warp's stores are
    visible, by one thread (a monotonic atomic max, so the flag never goes back)."""
    flags = flag + gl.zeros([WG_M], gl.int32, row_layout)
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, 0;", "=r,l", [flags], dtype=gl.int32, is_pure=False,
                              pack=1)
    _partition_barrier()
    one_per_thread: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    thread = gl.arange(0, 128, one_per_thread)
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.s32 p, $3, 0; @p red.release.gpu.global.max.s32 [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r,r", [flag + thread * 0, thread * 0 + value, thread], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _fold_running(acc, m_i, l_i, run_acc, run_ml, flag, chunk, row_layout: gl.constexpr):
    """Fold the running state of the tile's chunks before `chunk` into this chunk's (acc, max, sum)."""
    zero = _wait_flag(flag, chunk, row_layout)
    m_r = gl.load(run_ml + 2 * zero)
    l_r = gl.load(run_ml + 1 + 2 * zero)
    acc_r = gl.load(run_acc + zero[:, None])
    m_new = gl.maximum(m_i, m_r)
    # Chunk 0 holds key 0, which every row sees: the running max is finite; this chunk's may be -inf.
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    mine, theirs = gl.exp2(m_i - m_ref), gl.exp2(m_r - m_ref)
    return acc * mine[:, None] + acc_r * theirs[:, None], m_new, l_i * mine + l_r * theirs


@gluon.jit
def _consume_dense_item(args, item, it, wg: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr,
                        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                        s_layout: gl.constexpr, o_layout: gl.constexpr, io_layout: gl.constexpr):
    """Dense rows over one key chunk: fold in the earlier chunks' running state; hand it on, or (the tile's
    last chunk) store the rows, and for sample rows run their sparse part and store dense - sparse."""
    Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, q_tma, running, strides, scalars = args
    n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk = scalars
    (stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dr) = strides
    tile, batch, kv_head, chunk = _work_item(DENSE, item, n_items, n_rows, kv_heads, n_keys, key_chunk, GROUP)
    pmin, pmax, first_row = _cta_bounds(tile, DENSE, GROUP, n_rows, n_samples, gamma, sparse_end)
    chunk_lo, holds_keys, last = _chunk_span(chunk, key_chunk, pmax)
    if holds_keys:     # else the tile's rows end before the chunk: an empty item
        offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, io_layout))[None, :]
        r = wg * WG_M + gl.arange(0, WG_M, gl.SliceLayout(1, io_layout))
        pair = tile * CTA_M + r
        valid = pair < n_rows * GROUP
        row = gl.minimum(pair // GROUP, n_rows - 1)
        head = kv_head * GROUP + pair % GROUP
        pos = _dense_row_position(row, n_samples, gamma, 0, sparse_end)
        q_smem = _stage_q(Q, q_bufs, wg, batch, head, pos, stride_qb, stride_qh, stride_qn, offs_d)
        s_pos = gl.convert_layout(pos, gl.SliceLayout(1, s_layout))

        acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([WG_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([WG_M], gl.float32, gl.SliceLayout(1, s_layout))
        a_hi, a_full, b_lo, b_hi, b_full_lo, b_full_hi = _causal_chunk_segments(pmin, pmax, chunk_lo, key_chunk,
                                                                                BLOCK_N)
        # Causal over the chunk's keys (the rule's mask with a window of all keys).
        acc, m_i, l_i, it = _attend_pass(acc, m_i, l_i, it, wg, q_smem, k_bufs, v_bufs, bars, s_pos, a_hi, a_full,
                                         b_lo, b_hi, b_full_lo, b_full_hi, n_keys, qk_scale, s_layout, BLOCK_N,
                                         STAGES, PINGPONG)

        # The tile's running state: rows [slot * 128, slot * 128 + 128) of run_acc (HEAD_DIM floats each) and
        # run_ml (max, sum); this warpgroup's 64 rows, in the row layout of the output's stores.
        run_acc, run_ml, flags, counter, item_ids, item_ready, item_empty = running
        io_row: gl.constexpr = gl.SliceLayout(1, io_layout)
        slot = (batch * kv_heads + kv_head) * gl.cdiv(n_rows * GROUP, CTA_M) + tile
        run_rows = slot.to(gl.int64) * CTA_M + r
        run_acc = run_acc + run_rows[:, None] * HEAD_DIM + offs_d
        run_ml = run_ml + run_rows * 2
        flag = flags + slot * CONSUMERS + wg
        acc = gl.convert_layout(acc, io_layout)
        m_i = gl.convert_layout(m_i, io_row)
        l_i = gl.convert_layout(l_i, io_row)
        if chunk > 0:
            acc, m_i, l_i = _fold_running(acc, m_i, l_i, run_acc, run_ml, flag, chunk, io_row)
        if not last:    # a later chunk of the tile follows: hand the state on
            gl.store(run_acc, acc)
            gl.store(run_ml, m_i)
            gl.store(run_ml + 1, l_i)
            _release_flag(flag, chunk + 1, io_row)
        else:
            out = acc / l_i[:, None]
            o_rows = (O + batch.to(gl.int64) * stride_ob + head.to(gl.int64)[:, None] * stride_oh
                      + pos.to(gl.int64)[:, None] * stride_on)
            gl.store(o_rows + offs_d, out.to(O.dtype.element_ty), mask=valid[:, None])
            if WITH_DELTA:
                if first_row < n_samples:
                    # Sample rows: park dense in the delta buffer, run the sparse part, store dense - sparse.
                    is_sample = valid & _dense_row_is_sample(row, n_samples)
                    d_rows = (Delta + batch.to(gl.int64) * stride_db + head.to(gl.int64)[:, None] * stride_dh
                              + gl.minimum(row, n_samples - 1).to(gl.int64)[:, None] * stride_dr)
                    gl.store(d_rows + offs_d, out, mask=is_sample[:, None])
                    sample_pmax = gl.minimum(pmax, _sample_position(n_samples - 1, gamma, 0))
                    acc_s = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
                    m_s = gl.full([WG_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
                    l_s = gl.zeros([WG_M], gl.float32, gl.SliceLayout(1, s_layout))
                    sa_hi, sa_full, sb_lo, sb_hi, sb_full_lo, sb_full_hi = _sparse_segments(pmin, sample_pmax, sink,
                                                                                            window, BLOCK_N)
                    acc_s, m_s, l_s, it = _attend_pass(acc_s, m_s, l_s, it, wg, q_smem, k_bufs, v_bufs, bars,
                                                     gl.minimum(s_pos, sample_pmax), sa_hi, sa_full, sb_lo, sb_hi,
                                                     sb_full_lo, sb_full_hi, window, qk_scale, s_layout, BLOCK_N,
                                                     STAGES, PINGPONG)
                    sparse = _normalised(acc_s, l_s, io_layout)
                    dense = gl.load(d_rows + offs_d, mask=is_sample[:, None], other=0.0)   # this thread's own store
                    gl.store(d_rows + offs_d, dense - sparse, mask=is_sample[:, None])
    return it


@gluon.jit
def _consumer(args, wg: gl.constexpr, MODE: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              Q_TMA: gl.constexpr):
    _first_turn(wg, PINGPONG)
    if Q_TMA:
        first, end, step = _my_items(args)
        it = gl.to_tensor(0)
        for item in range(first, end, step):
            it = _consume_item(args, item, (item - first) // step, it, wg, MODE, GROUP, WITH_DELTA, HEAD_DIM,
                               BLOCK_N, STAGES, PINGPONG, Q_TMA)
    elif MODE == DENSE:
        i = gl.to_tensor(0)
        it = gl.to_tensor(0)
        item = _read_item(args, i)
        while item < _n_items(args):
            it = _consume_item(args, item, i, it, wg, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG,
                               Q_TMA)
            i += 1
            item = _read_item(args, i)
    else:
        _consume_item(args, gl.program_id(0), 0, gl.to_tensor(0), wg, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N,
                      STAGES, PINGPONG, Q_TMA)
    _last_turn(wg, PINGPONG)


@gluon.jit
def _consumer0(args, MODE: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr, HEAD_DIM: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, Q_TMA: gl.constexpr):
    _consumer(args, 0, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG, Q_TMA)


@gluon.jit
def _ws_kernel(Q, O, Delta, k_desc, v_desc, q_desc, run_acc, run_ml, flags, counter,
               stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dr,
               n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk,
               MODE: gl.constexpr, GROUP: gl.constexpr, WITH_DELTA: gl.constexpr, HEAD_DIM: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, Q_TMA: gl.constexpr,
               PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = k_desc.dtype
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_DIM], dtype)
    if Q_TMA:
        # Two buffers of the descriptor's box [1, GROUP, 128 / GROUP, HEAD_DIM]: the next item's Q loads early.
        q_box: gl.constexpr = [1, GROUP, CTA_M // GROUP, HEAD_DIM]
        q_bufs = gl.allocate_shared_memory(dtype, [2] + q_box, gl.NVMMASharedLayout.get_default_for(q_box, dtype))
    else:
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_M, HEAD_DIM], dtype)
        q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, WG_M, HEAD_DIM], q_layout)
    # Q buffer i is loaded (q_ready) and read by both consumers (q_empty); unused without Q_TMA.
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if Q_TMA:
        for s in gl.static_range(2):
            mbarrier.init(q_ready.index(s), count=1)
            mbarrier.init(q_empty.index(s), count=CONSUMERS)
    # Stages of the descriptors' 4-D box [1, 1, BLOCK_N, HEAD_DIM]; the consumers read them as 2-D tiles.
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)     # a stage is free once both warpgroups are done
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    bars = (k_ready, k_empty, v_ready, v_empty)
    # Dense rows: the work item each round, taken by the producer (item_ready) and read by both consumers
    # (item_empty), one 32-lane copy per slot of two.
    item_ids = gl.allocate_shared_memory(gl.int32, [2, 32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    item_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    item_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if MODE == DENSE:
        for s in gl.static_range(2):
            mbarrier.init(item_ready.index(s), count=1)
            mbarrier.init(item_empty.index(s), count=CONSUMERS)
    strides = (stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dr)
    scalars = (n_keys, kv_heads, n_rows, n_samples, gamma, sparse_end, sink, window, qk_scale, n_items, key_chunk)
    args = (Q, O, Delta, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, (q_desc, q_ready, q_empty),
            (run_acc, run_ml, flags, counter, item_ids, item_ready, item_empty), strides, scalars)
    gl.warp_specialize([
        (_consumer0, (args, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG, Q_TMA)),
        (_consumer, (args, 1, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, PINGPONG, Q_TMA)),
        (_producer, (args, 2, MODE, GROUP, WITH_DELTA, HEAD_DIM, BLOCK_N, STAGES, Q_TMA)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---- launcher ----

def shared_memory_bytes(head_dim: int, block_n: int, stages: int, q_buffers: int) -> int:
    """Shared memory of one CTA: q_buffers Q tiles of 128 rows (2 in the persistent sparse launch, 1 in the
    dense-rows one), the K/V ring, and the compiler's scratch (measured for D=128)."""
    return 2 * (q_buffers * CTA_M.value * head_dim + 2 * stages * block_n * head_dim) + 16 * 1024 + 512


def loads_q_by_tma(group: int) -> bool:
    """Whether persistent_q applies: Q_TMA's box [1, GROUP, 128 / GROUP, D] needs a GQA group dividing 128."""
    return CTA_M.value % group == 0


def tma_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, q_tma: bool) -> list:
    """The kernel's k_desc, v_desc and q_desc for one launch: 4-D over [B, H, N, D] (rows past N read as zeros);
    K and V in boxes of block_n keys, Q (with Q_TMA; else K's descriptor stands in, unused) in boxes of an
    item's rows, [1, GROUP, 128 / GROUP, D]."""
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    group, head_dim = q.shape[1] // k.shape[1], q.shape[-1]

    def over(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box,
                                gl.NVMMASharedLayout.get_default_for(box, gl_dtype))

    k_desc, v_desc = (over(t, [1, 1, block_n, head_dim]) for t in (k, v))
    return [k_desc, v_desc, over(q, [1, group, CTA_M.value // group, head_dim]) if q_tma else k_desc]


def default_key_chunk(n_keys: int, block_n: int) -> int:
    """Keys per dense-rows work item: about an eighth of the keys, a power of two in [4096, 32768] (a multiple
    of block_n). Whole-row items, the latest rows' as long as the sequence, left the last wave uneven; each
    item pays a pipeline start and hands its state on, so not too short; the keys of a chunk (16 MiB of K and
    V per head at D=128 and 32768 keys) stay in L2 while the CTAs running together read them."""
    eighth = max(n_keys // 8, 1)
    return max(block_n, min(32768, max(4096, 1 << (eighth.bit_length() - 1))))


def running_state(slots: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The dense launch's hand-over buffers for `slots` row tiles: unnormalised outputs, (max, sum) per row,
    a zeroed flag per (tile, consumer warpgroup), and the zeroed counter its CTAs take work items from."""
    rows = slots * CTA_M.value
    zeroed = torch.zeros(slots * CONSUMERS.value + 1, device=device, dtype=torch.int32)
    return (torch.empty(rows * head_dim, device=device, dtype=torch.float32),
            torch.empty(rows * 2, device=device, dtype=torch.float32), zeroed[:-1], zeroed[-1:])


def launch_hopper_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                  plan: DeltaPlan, scale: float, delta: torch.Tensor | None = None, *,
                                  block_n: int = HOPPER_DEFAULT.block_n, stages: int = HOPPER_DEFAULT.num_stages,
                                  dense_block_n: int = HOPPER_DEFAULT.dense_block_n,
                                  dense_stages: int = HOPPER_DEFAULT.dense_num_stages,
                                  pingpong: bool = False, dense_pingpong: bool = False, persistent_q: bool = False,
                                  dense_key_chunk: int = 0, producer_regs: int = 24,
                                  consumer_regs: int = 240) -> torch.Tensor:
    """Both launches into `out`, like triton_delta.launch_delta_attention (same plan, same delta buffer).

    pingpong, dense_pingpong: in the sparse-rows (dense-rows) launch, the two consumers take turns issuing
    products (one's softmax runs under the other's).
    persistent_q: the sparse-rows launch runs one CTA per multiprocessor, each looping over work items,
    with the producer loading each item's Q by TMA ahead of the consumers (GQA groups dividing 128).
    dense_key_chunk: keys per dense-rows work item, a multiple of dense_block_n (0: default_key_chunk).
    Whole prompts only (the row helpers get start 0): a chunk of a longer prompt runs the Triton kernels
    (dispatch.hopper_reason).
    """
    if plan.start != 0 or plan.prompt_length != plan.n:
        raise ValueError(f"the Hopper kernels run whole prompts only, got rows from start={plan.start} of a "
                         f"prompt_length={plan.prompt_length} prompt over N={plan.n} keys")
    batch, q_heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    with_delta = plan.carries_delta
    if with_delta and delta is None:
        delta = torch.empty(batch, q_heads, plan.n_samples, head_dim, device=q.device, dtype=torch.float32)
    delta_arg = delta if with_delta else out
    strides = (*q.stride()[:3], *out.stride()[:3], *delta_arg.stride()[:3])

    common = dict(GROUP=group, WITH_DELTA=with_delta, HEAD_DIM=head_dim,
                  PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs, num_warps=4)
    sink, window = plan.sparse_kernel_sink, plan.sparse_kernel_window
    for mode, rows, bn, stages_, turns in ((DENSE, plan.dense_kernel_rows, dense_block_n, dense_stages, dense_pingpong),
                                           (SPARSE, plan.sparse_kernel_rows, block_n, stages, pingpong)):
        if rows == 0:
            continue
        slots = triton.cdiv(rows * group, CTA_M) * batch * kv_heads     # row tiles
        if mode == DENSE:
            chunk = dense_key_chunk or default_key_chunk(n, bn)
            if chunk < 0 or chunk % bn:
                raise ValueError(f"dense_key_chunk must be a positive multiple of dense_block_n={bn}, "
                                 f"got dense_key_chunk={dense_key_chunk}")
            n_items = slots * triton.cdiv(n, chunk)
            running = running_state(slots if n > chunk else 1, head_dim, q.device)
        else:
            n_items, chunk, running = slots, n, running_state(1, head_dim, q.device)     # (unused)
        q_tma = persistent_q and mode == SPARSE and loads_q_by_tma(group)
        grid = n_items
        if q_tma or mode == DENSE:
            grid = min(n_items, torch.cuda.get_device_properties(q.device).multi_processor_count)
        _ws_kernel[(grid, )](q, out, delta_arg, *tma_descriptors(q, k, v, bn, q_tma), *running, *strides,
                             n, kv_heads, rows, plan.n_samples, plan.gamma, plan.sparse_end, sink, window,
                             scale * _LOG2E, n_items, chunk, MODE=mode, BLOCK_N=bn, STAGES=stages_, PINGPONG=turns,
                             Q_TMA=q_tma, **common)
    return out
