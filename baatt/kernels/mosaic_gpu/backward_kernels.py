"""The Mosaic GPU backward kernels (dq and dk/dv) on Hopper (sm90).

FA2-style split, both kernels warp specialised like the forward (a producer warpgroup streams
tiles by index through a shared-memory ring, two consumer warpgroups run wgmma):

* dq: one CTA per 128 query rows, walking the forward list (K/V tiles);
* dk/dv: one CTA per 128 key rows of a kv head, walking, for every query head of its GQA group,
  the query blocks that selected its key block (the transposed list), Q/dO tiles of 64 rows.

docs/spec.md section 6: ds = p * (dp - delta), delta = rowsum(dO * O) (minus d lse).

Scheduling inside a consumer warpgroup:

* both score products of a step (S = Q K^T and dP = dO V^T in dq; S^T and dP^T in dk/dv) are
  issued back to back and awaited one by one (``wgmma_accumulator_load(wait_n=1)``), so the
  exponentials of S overlap the dP product;
* the two gradient products of a dk/dv step (dV += P^T dO, dK += dS^T Q) are issued together
  and awaited once;
* ``BwdTuning.pingpong`` (off by default): a schedule barrier makes the two consumer warpgroups
  take turns on the tensor cores, as in the forward.

Causal masks (``span``): a tile crossing the mask's edge hides the keys past each query's limit
before the exponentials (p = 0 there, so ds = 0), as in the forward; other tiles are unmasked.

Layouts: block space, or (``positional``) the caller's [B, L, H, D] q/k/v/dO and gradients, read
and written by strided TMA (no transposes around the kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from baatt.kernels.common import LOG2E, backward_row_terms, pack_selection, transpose_selection
from baatt.kernels.mosaic_gpu._pipeline import (
    SWIZZLED,
    bias_and_outputs,
    launch,
    load_own_tiles,
    mask_on_edge,
    row_view,
    row_walks,
    run_warp_specialized,
    take_turn_at,
    tile_grid,
    work_items,
)
from baatt.kernels.mosaic_gpu.config import (
    BWD_TILE_Q,
    CONSUMERS,
    DEFAULT_BWD_TUNING,
    SMEM_BYTES,
    TILE_Q,
    WG_ROWS,
    BwdTuning,
)


def _bwd_stages(per_stage: int, fixed: int) -> int:
    return max(2, min(3, (SMEM_BYTES - fixed) // per_stage))  # dq: 2 stages of K/V fit beside Q and dO


def dq_call(q, k, v, bias, sel, lse2, delta, do, *, scale, block_q, block_k, tile_k, positional, t: BwdTuning,
            span: int | None = None):
    """The dq kernel alone: sel packs the forward list (``pack_selection``), lse2 and delta come from
    ``backward_row_terms``, bias is None when every key is valid; tile_k: key rows per step; span: that
    of a causal mask, None when bidirectional."""
    if positional:
        batch, lq, q_heads, d = q.shape
        kv_heads = k.shape[2]
    else:
        batch, q_heads, lq, d = q.shape
        kv_heads = k.shape[1]
    rows_of = row_view(positional)
    group = q_heads // kv_heads
    dtype = q.dtype
    isz = jnp.dtype(dtype).itemsize
    per_block = block_k // tile_k
    rows_per_sel = block_q // TILE_Q
    masked = bias is not None
    qk_scale = float(scale) * LOG2E
    stages = _bwd_stages(2 * tile_k * d * isz + 4 * tile_k, 2 * TILE_Q * d * isz + 8 * TILE_Q + 4096)

    def body(q_ref, k_ref, v_ref, sel_ref, lse_ref, delta_ref, do_ref, *rest):
        bias_ref, (dq_ref,) = bias_and_outputs(rest, masked)
        _, item = work_items(False, None, q_heads, lq // TILE_Q, batch, "baatt_q_tile", t.tile_major)
        b, h, qt, steps, tile_start = row_walks(False, item, sel_ref, rows_per_sel=rows_per_sel, per_block=per_block,
                                                block_k=block_k, tile_k=tile_k, rotate=t.rotate)(0)

        def kernel(scratch, barriers):
            q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, bias_smem = scratch
            in_ready, k_ready, v_ready, bias_ready, k_free, v_free, turn = barriers
            wg = lax.axis_index("baatt_wg")
            take_turn = functools.partial(take_turn_at, turn) if t.pingpong else (lambda: None)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                row0 = qt * TILE_Q + wg * WG_ROWS
                rows = pl.ds(row0, WG_ROWS)
                my_q, my_do = q_smem.at[wg], do_smem.at[wg]
                load_own_tiles([(rows_of(q_ref, b, h, rows), my_q), (rows_of(do_ref, b, h, rows), my_do),
                                 (lse_ref.at[b, h, rows], lse_smem.at[wg]),
                                 (delta_ref.at[b, h, rows], delta_smem.at[wg])], in_ready, wg)
                lse2 = plgpu.load(lse_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                dlt = plgpu.load(delta_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                dq = plgpu.layout_cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                pl.when(wg == 1)(take_turn)  # warpgroup 1 starts one turn behind

                def step_fn(step, dq):
                    slot = lax.rem(step, jnp.int32(stages))
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])

                    def probs(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, my_q, k_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(dp_ref, my_do, v_smem.at[slot].transpose((1, 0)))
                        take_turn()
                        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1) * qk_scale  # dP still running
                        if masked:
                            plgpu.barrier_wait(bias_ready.at[slot])
                            kb = plgpu.load(bias_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                            s = s + lax.broadcast_in_dim(kb, s.shape, [1])
                        if span is not None:
                            s = mask_on_edge(s, row0, tile_start(step), tile_k, span)
                        p = jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [0]))
                        dp = dp_ref[...]
                        return (p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))).astype(dtype)

                    acc = plgpu.ACC((WG_ROWS, tile_k), jnp.float32)
                    ds = pl.run_scoped(probs, acc, acc)
                    plgpu.barrier_arrive(v_free.at[slot])
                    if t.pingpong:
                        ds = lax.optimization_barrier(ds)
                    take_turn()  # element-wise part done; then the tensor cores are ours

                    def grad_q(acc_ref):
                        plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

                    dq = pl.run_state(grad_q)(plgpu.ACC.init(dq))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq

                dq = lax.fori_loop(0, steps, step_fn, dq)
                pl.when(wg == 0)(take_turn)
                my_q[...] = (dq * float(scale)).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_q, rows_of(dq_ref, b, h, rows))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                kvh = lax.div(h, jnp.int32(group)) if group > 1 else h

                @pl.loop(0, steps)
                def _(step):
                    slot = lax.rem(step, jnp.int32(stages))
                    rows = pl.ds(tile_start(step), tile_k)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])

                    plgpu.copy_gmem_to_smem(rows_of(k_ref, b, kvh, rows), k_smem.at[slot], k_ready.at[slot])
                    if masked:
                        plgpu.copy_gmem_to_smem(bias_ref.at[b, kvh, rows], bias_smem.at[slot], bias_ready.at[slot])

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])

                    plgpu.copy_gmem_to_smem(rows_of(v_ref, b, kvh, rows), v_smem.at[slot], v_ready.at[slot])

        scratch = [
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),
            plgpu.SMEM((stages, tile_k, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tile_k), jnp.float32) if masked else None,
        ]
        barriers = [
            plgpu.Barrier(num_barriers=4 * CONSUMERS),  # in_ready
            plgpu.Barrier(num_barriers=stages),  # k_ready
            plgpu.Barrier(num_barriers=stages),  # v_ready
            plgpu.Barrier(num_barriers=stages),  # bias_ready
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # k_free
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # v_free
            plgpu.Barrier(num_arrivals=CONSUMERS),  # turn
        ]
        run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, sel, lse2, delta, do) + ((bias,) if masked else ())
    return launch(body, jax.ShapeDtypeStruct(q.shape, dtype),
                   tile_grid(q_heads, lq // TILE_Q, batch, "baatt_q_tile", t.tile_major),
                   name="baatt_block_sparse_dq")(*inputs)


def dkv_call(q, k, v, bias, selt, lse2, delta, do, *, scale, block_q, block_k, positional, t: BwdTuning,
             span: int | None = None):
    """The dk/dv kernel alone: selt packs the transposed list (``transpose_selection``), the rest as
    for ``dq_call``."""
    batch, d = q.shape[0], q.shape[3]
    q_heads = q.shape[2] if positional else q.shape[1]
    lk, kv_heads = (k.shape[1], k.shape[2]) if positional else (k.shape[2], k.shape[1])
    rows_of = row_view(positional)
    group = q_heads // kv_heads
    dtype = q.dtype
    isz = jnp.dtype(dtype).itemsize
    tq = BWD_TILE_Q
    per_q = block_q // tq
    tiles_per_block = block_k // TILE_Q
    masked = bias is not None
    qk_scale = float(scale) * LOG2E
    per_stage, fixed = 2 * tq * d * isz + 8 * tq, 2 * TILE_Q * d * isz + 4 * TILE_Q + 4096
    stages = t.dkv_stages or max(2, min(4, (SMEM_BYTES - fixed) // per_stage))
    if fixed + stages * per_stage > SMEM_BYTES:
        raise ValueError(f"BwdTuning.dkv_stages={stages} needs more than {SMEM_BYTES} bytes of shared memory")

    def body(q_ref, k_ref, v_ref, selt_ref, lse_ref, delta_ref, do_ref, *rest):
        bias_ref, (dk_ref, dv_ref) = bias_and_outputs(rest, masked)
        b = lax.axis_index("baatt_batch")
        kvh = lax.axis_index("baatt_heads")
        kt = lax.axis_index("baatt_k_tile")
        kblk = lax.div(kt, jnp.int32(tiles_per_block)) if tiles_per_block > 1 else kt

        def head_steps(g):
            return selt_ref[b, kvh * group + g, kblk, 0] * per_q

        def q_start(g, step):
            if t.rotate:
                n = jnp.maximum(head_steps(g), 1)
                step = lax.rem(step + lax.rem(kt, n), n)
            j = lax.div(step, jnp.int32(per_q)) if per_q > 1 else step
            start = selt_ref[b, kvh * group + g, kblk, 1 + j] * block_q
            if per_q > 1:
                start = start + lax.rem(step, jnp.int32(per_q)) * tq
            return start

        def kernel(scratch, barriers):
            k_smem, v_smem, kbias_smem, q_smem, do_smem, lse_smem, delta_smem = scratch
            own_ready, q_ready, do_ready, lse_ready, delta_ready, q_free, turn = barriers
            wg = lax.axis_index("baatt_wg")
            take_turn = functools.partial(take_turn_at, turn) if t.pingpong else (lambda: None)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                row0 = kt * TILE_Q + wg * WG_ROWS
                rows = pl.ds(row0, WG_ROWS)
                my_k, my_v = k_smem.at[wg], v_smem.at[wg]
                own = [(rows_of(k_ref, b, kvh, rows), my_k), (rows_of(v_ref, b, kvh, rows), my_v)]
                load_own_tiles(own + ([(bias_ref.at[b, kvh, rows], kbias_smem.at[wg])] if masked else []),
                                own_ready, wg)
                kbias = plgpu.load(kbias_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1)) if masked else None
                zeros = plgpu.layout_cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                pl.when(wg == 1)(take_turn)  # warpgroup 1 starts one turn behind

                def step_fn(g, step, carry):
                    dk, dv, n = carry
                    slot = lax.rem(n, jnp.int32(stages))
                    plgpu.barrier_wait(q_ready.at[slot])
                    plgpu.barrier_wait(do_ready.at[slot])

                    def probs(st_ref, dpt_ref):  # rows keys, columns queries
                        plgpu.wgmma(st_ref, my_k, q_smem.at[slot].transpose((1, 0)))
                        plgpu.wgmma(dpt_ref, my_v, do_smem.at[slot].transpose((1, 0)))
                        take_turn()
                        plgpu.barrier_wait(lse_ready.at[slot])
                        lse = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                        st = plgpu.wgmma_accumulator_load(st_ref, wait_n=1) * qk_scale  # dP^T still running
                        if masked:
                            st = st + lax.broadcast_in_dim(kbias, st.shape, [0])
                        if span is not None:
                            st = mask_on_edge(st, q_start(g, step), row0, WG_ROWS, span, keys_axis=0)
                        pt = jnp.exp2(st - lax.broadcast_in_dim(lse, st.shape, [1]))
                        plgpu.barrier_wait(delta_ready.at[slot])
                        dlt = plgpu.load(delta_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                        dpt = dpt_ref[...]
                        dst = pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))
                        return pt.astype(dtype), dst.astype(dtype)

                    acc = plgpu.ACC((WG_ROWS, tq), jnp.float32)
                    pt, dst = pl.run_scoped(probs, acc, acc)
                    if t.pingpong:
                        pt, dst = lax.optimization_barrier((pt, dst))
                    take_turn()  # element-wise part done; then the tensor cores are ours

                    def grads(refs):
                        dv_ref, dk_ref = refs
                        plgpu.wgmma(dv_ref, pt, do_smem.at[slot])
                        plgpu.wgmma(dk_ref, dst, q_smem.at[slot])

                    dv, dk = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dk, dv, n + 1

                carry = (zeros, zeros, jnp.int32(0))
                for g in range(group):
                    carry = lax.fori_loop(0, head_steps(g), functools.partial(step_fn, g), carry)
                dk, dv, _ = carry
                pl.when(wg == 0)(take_turn)
                my_k[...] = (dk * float(scale)).astype(dtype)
                my_v[...] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_k, rows_of(dk_ref, b, kvh, rows))
                plgpu.copy_smem_to_gmem(my_v, rows_of(dv_ref, b, kvh, rows))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == CONSUMERS)
            def _producer():
                plgpu.set_max_registers(40, action="decrease")
                n = jnp.int32(0)
                for g in range(group):
                    h = kvh * group + g

                    def prod(step, n, g=g, h=h):
                        slot = lax.rem(n, jnp.int32(stages))
                        rows = pl.ds(q_start(g, step), tq)

                        @pl.when(n >= stages)
                        def _():
                            plgpu.barrier_wait(q_free.at[slot])

                        plgpu.copy_gmem_to_smem(rows_of(q_ref, b, h, rows), q_smem.at[slot], q_ready.at[slot])
                        plgpu.copy_gmem_to_smem(rows_of(do_ref, b, h, rows), do_smem.at[slot], do_ready.at[slot])
                        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_ready.at[slot])
                        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], delta_ready.at[slot])
                        return n + 1

                    n = lax.fori_loop(0, head_steps(g), prod, n)

        scratch = [
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32) if masked else None,
            plgpu.SMEM((stages, tq, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tq, d), dtype, **SWIZZLED),
            plgpu.SMEM((stages, tq), jnp.float32),
            plgpu.SMEM((stages, tq), jnp.float32),
        ]
        barriers = [
            plgpu.Barrier(num_barriers=3 * CONSUMERS),  # own_ready (K, V, key bias)
            plgpu.Barrier(num_barriers=stages),  # q_ready
            plgpu.Barrier(num_barriers=stages),  # do_ready
            plgpu.Barrier(num_barriers=stages),  # lse_ready
            plgpu.Barrier(num_barriers=stages),  # delta_ready
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # q_free
            plgpu.Barrier(num_arrivals=CONSUMERS),  # turn
        ]
        run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, selt, lse2, delta, do) + ((bias,) if masked else ())
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    return launch(body, out_type, tile_grid(kv_heads, lk // TILE_Q, batch, "baatt_k_tile", t.tile_major),
                   name="baatt_block_sparse_dkv")(*inputs)


def backward(q, k, v, bias, indices, counts, out, lse, do, dlse, *, scale, block_q, block_k,
             tuning: BwdTuning = DEFAULT_BWD_TUNING, positional: bool = False, span: int | None = None):
    """dq, dk, dv; bias None = every key valid; span: that of a causal mask (rows and keys at their
    positions), None when bidirectional.

    Block space (q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]), or with ``positional`` the caller's
    [B, L, H, D] arrays, which the kernels read and write by strided TMA.
    """
    do, delta, lse2 = backward_row_terms(out, lse, do, dlse, heads_last=positional)
    nk = (k.shape[1] if positional else k.shape[2]) // block_k
    tile_k = min(block_k, 128)
    sel = pack_selection(indices, counts)
    indices_t, counts_t = transpose_selection(indices, counts, nk)
    selt = pack_selection(indices_t, counts_t)
    dq = dq_call(q, k, v, bias, sel, lse2, delta, do, scale=scale, block_q=block_q, block_k=block_k, tile_k=tile_k,
                 positional=positional, t=tuning, span=span)
    dk, dv = dkv_call(q, k, v, bias, selt, lse2, delta, do, scale=scale, block_q=block_q, block_k=block_k,
                      positional=positional, t=tuning, span=span)
    return dq, dk, dv
