"""The Mosaic GPU forward kernel: block-sparse flash attention on Hopper (sm90).

Semantics: ``baatt.reference.attention.block_sparse_blocked`` (docs/spec.md section 6),
in block space (``baatt.layout.BlockSpace``): q [B, Hq, Nq*bq, D], k/v
[B, Hkv, Nk*bk, D]; the selection is indices [B, Hq, Nq, kmax] + counts [B, Hq, Nq],
packed by ``baatt.kernels.common.pack_selection``.

One CTA per (query head, 128-row query tile, batch) with three warpgroups:

* two consumer warpgroups, 64 query rows each (the same selection row, so they
  share every K/V tile), run QK^T and PV on the tensor cores (wgmma) with an
  online softmax in float32, base 2; a schedule barrier makes them alternate so
  one runs its softmax while the other holds the tensor cores;
* one producer warpgroup reads the row's count and block ids from global memory
  and streams the selected K/V tiles into a ring of ``stages`` shared-memory
  slots with TMA; a slot is refilled once both consumers have released it.

Persistent forward (``Tuning.persistent``, picked on short walks): one CTA per SM takes (query tile,
head, batch) items in launch order; the ring runs on from one item into the next, the next item's Q
is loaded into a second buffer during the current one, and each output store overlaps the next item.

GQA: the producer loads from kv head ``h // (Hq // Hkv)``; K/V are never repeated.
The walk over a row's selected tiles starts at a row-dependent offset and wraps
(softmax is order-free), so CTAs running at the same time read different K/V.

Causal masks (``span``): rows and keys sit at their positions; a tile whose keys reach past its
first row's limit compares positions and hides those keys (``-inf``), every other tile runs as
without a mask.

Key masks: the kernel adds a per-key bias of ``-inf`` streamed beside K (K/V
rows already zeroed there); without masked keys it is compiled without the bias.
Unselected blocks and the unused tail of an index list are never read.

Outputs: out in q's dtype, lse float32 in natural log (``-inf`` and a zero
output for a row that saw no valid key).

Layouts: block space (head-major), or with ``positional=True`` the caller's
[B, L, H, D] arrays read and written by strided TMA (no permutation, no mask).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from baatt.kernels.common import LN2, LOG2E, RUNNING_MAX_INIT
from baatt.kernels.mosaic_gpu._pipeline import (
    SWIZZLED,
    bias_and_outputs,
    launch,
    mask_on_edge,
    num_sms,
    produce_items,
    row_view,
    row_walks,
    run_warp_specialized,
    take_turn_at,
    tile_grid,
    work_items,
)
from baatt.kernels.mosaic_gpu.config import CONSUMERS, DEFAULT_TUNING, TILE_Q, WG_ROWS, Tuning, q_buffers


def forward(q, k, v, sel, bias, *, scale: float, block_q: int, block_k: int, tuning: Tuning = DEFAULT_TUNING,
            positional: bool = False, span: int | None = None, interpret: bool = False):
    """out [B, Hq, Lq, D], lse [B, Hq, Lq] (natural log).

    sel: ``pack_selection(indices, counts)``. bias: float32 [B, Hkv, Lk] (0 valid,
    -inf masked; K/V rows already zeroed there) or None when every key is valid.
    positional: q/out are [B, Lq, Hq, D] and k/v [B, Lk, Hkv, D] (the caller's
      layout, no permutation): TMA reads strided rows, so no transpose is needed.
    span: that of a causal mask (``AttentionMask.span``; rows and keys at their positions), None when
      bidirectional: the tiles crossing the mask's edge hide the keys past each row's limit.
    ``tuning.persistent`` (derived from the walk length when None): one CTA per SM walks the work items
      (query tile, head, batch) cta, cta + #CTAs, ...; the K/V ring runs on across items and the next
      item's Q is loaded during the current one, so the per-item start (launch, first loads) and the
      output stores overlap the tensor-core work.
    """
    if positional:
        batch, lq, q_heads, d = q.shape
        _, lk, kv_heads, _ = k.shape
    else:
        batch, q_heads, lq, d = q.shape
        _, kv_heads, lk, _ = k.shape
    rows_of = row_view(positional)
    group = q_heads // kv_heads
    dtype = q.dtype
    t = tuning.resolve(block_k, d, jnp.dtype(dtype).itemsize, kmax=sel.shape[-1] - 1)
    tile_k, stages = t.tile_k, t.stages
    per_block = block_k // tile_k
    rows_per_sel = block_q // TILE_Q  # CTAs sharing one selection row
    masked = bias is not None
    qk_scale = float(scale) * LOG2E
    tiles = lq // TILE_Q
    n_items = q_heads * tiles * batch
    num_ctas = min(n_items, t.ctas or num_sms()) if t.persistent else None
    q_bufs = q_buffers(t.persistent)

    def body(q_ref, k_ref, v_ref, sel_ref, *rest):
        bias_ref, (out_ref, lse_ref) = bias_and_outputs(rest, masked)
        n_mine, item = work_items(t.persistent, num_ctas, q_heads, tiles, batch, "baatt_q_tile", t.tile_major)

        walk = row_walks(t.persistent, item, sel_ref, rows_per_sel=rows_per_sel, per_block=per_block,
                         block_k=block_k, tile_k=tile_k, rotate=t.rotate)

        def ring_slot(n):
            return lax.rem(n, jnp.int32(stages))

        def kernel(scratch, barriers):
            q_smem, k_smem, v_smem, bias_smem, lse_smem = scratch
            k_ready, v_ready, q_ready, bias_ready, k_free, v_free, turn = barriers
            wg = lax.axis_index("baatt_wg")
            take_turn = functools.partial(take_turn_at, turn)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")

                # Buffer ``buf`` of this warpgroup's Q tile (which then stages its output), lse, Q barrier.
                if t.persistent:
                    my_buf = lambda buf: (q_smem.at[buf, wg], lse_smem.at[buf, wg], q_ready.at[buf * CONSUMERS + wg])
                else:
                    my_buf = lambda buf: (q_smem.at[wg], lse_smem.at[wg], q_ready.at[wg])

                def load_q(i, buf):
                    b, h, qt = item(i) if t.persistent else walk(0)[:3]
                    my_q, _, ready = my_buf(buf)
                    plgpu.copy_gmem_to_smem(rows_of(q_ref, b, h, pl.ds(qt * TILE_Q + wg * WG_ROWS, WG_ROWS)), my_q,
                                            ready)

                def attend(i, base):
                    """The i-th item; ``base``: ring steps taken before it. Returns the ring steps after it."""
                    b, h, qt, steps, key_start = walk(i)
                    buf = lax.rem(i, 2) if t.persistent else 0
                    my_q, my_lse, q_ready_ = my_buf(buf)
                    row0 = qt * TILE_Q + wg * WG_ROWS
                    if not t.persistent:
                        load_q(i, 0)
                    plgpu.barrier_wait(q_ready_)
                    if t.persistent:
                        @pl.when(i + 1 < n_mine)
                        def _():
                            # The other buffer staged the previous item's output: once the TMA store has
                            # read it, it takes the next item's Q.
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            load_q(i + 1, 1 - buf)
                    slot_of = (lambda s: ring_slot(s + base)) if t.persistent else ring_slot
                    m = plgpu.layout_cast(jnp.full((WG_ROWS,), RUNNING_MAX_INIT, jnp.float32),
                                          plgpu.Layout.WGMMA.reduce(1))
                    l = plgpu.layout_cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    acc = plgpu.layout_cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                    @pl.when(steps > 0)
                    def _():
                        plgpu.barrier_wait(k_ready.at[ring_slot(base) if t.persistent else 0])

                    if not t.persistent:
                        # Warpgroup 1 starts one turn behind, so the two alternate on the tensor cores.
                        pl.when(wg == 1)(take_turn)

                    def step_fn(step, carry):
                        acc, m, l = carry
                        slot = slot_of(step)

                        def scores(acc_ref):
                            plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                            take_turn()
                            return acc_ref[...]

                        s = pl.run_scoped(scores, plgpu.ACC((WG_ROWS, tile_k), jnp.float32))
                        if span is not None:
                            # Before the scale: -inf stays -inf, and rows this tile hides wholly keep
                            # their finite running max.
                            s = mask_on_edge(s, row0, key_start(step), tile_k, span)
                        if masked:
                            plgpu.barrier_wait(bias_ready.at[slot])
                            kb = plgpu.load(bias_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                            s = s * qk_scale + lax.broadcast_in_dim(kb, s.shape, [1])
                            plgpu.barrier_arrive(k_free.at[slot])
                            m_new = jnp.maximum(m, s.max(axis=1))
                            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        else:
                            plgpu.barrier_arrive(k_free.at[slot])
                            # Scale folded into the exponent (one FMA per score), docs/spec.md section 6.
                            m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
                            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        alpha = jnp.exp2(m - m_new)
                        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                        l = l * alpha + p.sum(axis=1)
                        p_lo = p.astype(dtype)
                        acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
                        plgpu.barrier_arrive(turn)  # softmax done
                        plgpu.barrier_wait(v_ready.at[slot])
                        plgpu.barrier_wait(turn)  # the tensor cores are ours

                        def values(acc_ref):
                            plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                            nxt = step + 1

                            @pl.when(nxt < steps)
                            def _():
                                plgpu.barrier_wait(k_ready.at[slot_of(nxt)])

                        acc = pl.run_state(values)(plgpu.ACC.init(acc))
                        plgpu.barrier_arrive(v_free.at[slot])
                        return acc, m_new, l

                    acc, m, l = lax.fori_loop(0, steps, step_fn, (acc, m, l))
                    if not t.persistent:
                        pl.when(wg == 0)(take_turn)

                    seen = l > 0.0
                    l_safe = jnp.where(seen, l, 1.0)
                    inv = 1.0 / l_safe
                    my_q[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
                    my_lse[...] = jnp.where(seen, m * LN2 + jnp.log(l_safe), -jnp.inf)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(my_q, rows_of(out_ref, b, h, pl.ds(row0, WG_ROWS)))
                    plgpu.copy_smem_to_gmem(my_lse, lse_ref.at[b, h, pl.ds(row0, WG_ROWS)])
                    return base + steps

                if t.persistent:
                    load_q(0, 0)
                    # One turn offset for the whole walk: at an item boundary one warpgroup stores its
                    # output while the other finishes its last tile.
                    pl.when(wg == 1)(take_turn)
                    lax.fori_loop(0, n_mine, attend, jnp.int32(0))
                    pl.when(wg == 0)(take_turn)
                else:
                    attend(0, 0)
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")

                def wait_free(refill, barrier):
                    if refill is True:
                        plgpu.barrier_wait(barrier)
                    elif refill is not False:  # known only at run time
                        pl.when(refill)(lambda: plgpu.barrier_wait(barrier))

                def fill(tile_start, b, kvh, step, slot, refill=False):
                    # refill: the slot held an earlier tile; wait for both consumers to release K (then V).
                    rows = pl.ds(tile_start(step), tile_k)
                    wait_free(refill, k_free.at[slot])
                    plgpu.copy_gmem_to_smem(rows_of(k_ref, b, kvh, rows), k_smem.at[slot], k_ready.at[slot])
                    if masked:
                        plgpu.copy_gmem_to_smem(bias_ref.at[b, kvh, rows], bias_smem.at[slot], bias_ready.at[slot])
                    wait_free(refill, v_free.at[slot])
                    plgpu.copy_gmem_to_smem(rows_of(v_ref, b, kvh, rows), v_smem.at[slot], v_ready.at[slot])

                def kv_head(h):
                    return lax.div(h, jnp.int32(group)) if group > 1 else h

                if t.persistent:
                    produce_items(n_mine, walk, lambda w, s, n: fill(w[4], w[0], kv_head(w[1]), s, ring_slot(n),
                                                                      refill=n >= stages))
                else:
                    b, h, _, steps, tile_start = walk(0)
                    kvh = kv_head(h)
                    for i in range(stages):  # fill the ring
                        @pl.when(i < steps)
                        def _(i=i):
                            fill(tile_start, b, kvh, jnp.int32(i), i)

                    @pl.loop(0, jnp.maximum(steps - stages, 0))
                    def _(step):
                        slot = ring_slot(step)
                        fill(tile_start, b, kvh, step + stages, slot, refill=True)

        scratch = [
            plgpu.SMEM((q_bufs,) * t.persistent + (CONSUMERS, WG_ROWS, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tile_k), jnp.float32) if masked else None,
            plgpu.SMEM((q_bufs,) * t.persistent + (CONSUMERS, WG_ROWS), jnp.float32),
        ]
        barriers = [
            plgpu.Barrier(num_barriers=stages),  # k_ready
            plgpu.Barrier(num_barriers=stages),  # v_ready
            plgpu.Barrier(num_barriers=q_bufs * CONSUMERS),  # q_ready
            plgpu.Barrier(num_barriers=stages),  # bias_ready
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # k_free
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # v_free
            plgpu.Barrier(num_arrivals=CONSUMERS),  # turn
        ]
        run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, sel) + ((bias,) if masked else ())
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, q_heads, lq), jnp.float32))
    grid = ((num_ctas,), ("baatt_cta",)) if t.persistent else tile_grid(q_heads, tiles, batch, "baatt_q_tile", t.tile_major)
    return launch(body, out_type, grid, name="baatt_block_sparse_fwd", interpret=interpret)(*inputs)
