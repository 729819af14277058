"""Block-sparse flash attention for Hopper (sm90) in Pallas Mosaic GPU: forward and backward.

Semantics: ``baatt.reference.attention.block_sparse_blocked`` (SPEC.md section 6),
in block space (``baatt.layout.BlockSpace``): q [B, Hq, Nq*bq, D], k/v
[B, Hkv, Nk*bk, D]; the selection is indices [B, Hq, Nq, kmax] + counts [B, Hq, Nq].

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

Key masks (padding, holes): the wrapper zeroes masked K/V rows with ``where``
(NaN/Inf stored there cannot leak) and the kernel adds a per-key bias of
``-inf`` streamed beside K. Without masked keys (the common case) the kernel is
compiled without the bias. Unselected blocks and the unused tail of an index
list are never read.

Outputs: out in q's dtype, lse float32 in natural log (``-inf`` and a zero
output for a row that saw no valid key).

Layouts: block space (head-major), or with ``positional=True`` the caller's
[B, L, H, D] arrays read and written by strided TMA (no permutation, no mask).
Backward (bottom of the file): a dq kernel over the forward list and a dk/dv
kernel over the transposed list, with the same producer/consumer structure.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from baatt.kernels.pallas_triton import block_sparse as triton_kernel

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite start of the running max: a row that has only seen masked keys keeps it,
# so exp2(-inf - m) = 0 and exp2(m_old - m_new) = 1, never NaN.
_M_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)

WG_ROWS = 64  # query rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = 2
TILE_Q = WG_ROWS * CONSUMERS  # query rows per CTA
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_BLOCK_Q = (128, 256)
SUPPORTED_BLOCK_K = (64, 128, 256)
_SMEM_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Static launch parameters of the forward kernel.

    tile_k: key rows per pipeline step (<= block_k, divides it; 64 or 128).
    stages: shared-memory slots in the K/V ring (>= 2).
    rotate: start each CTA's walk at a different selected tile.
    tile_major: query tiles vary fastest in the launch order, so CTAs running together share a head's
      K/V in L2 (default); False: heads fastest. For ``persistent``, the order in which CTAs take work
      items: heads fastest made it ~15% slower on an H200.
    persistent: one CTA per SM walks many (query tile, head, batch) items with the K/V ring running
      on across them and the next item's Q double-buffered (see ``forward``). None: persistent when a
      row's walk is at most ``PERSISTENT_MAX_STEPS`` tiles (``kmax * block_k / tile_k``): short walks
      are where a CTA's start and end show (H200, 32K tokens: 93.2% -> 95.8% of cuDNN's throughput at
      90% sparsity, 87.6% -> 91.8% at 95%), while on long walks the static item order loses the L2
      locality of the hardware's launch order (128K tokens, 70% sparsity: 100.4% -> 93.4%).
    ctas: with ``persistent``, how many CTAs (None: one per SM; tests use a few to make each walk long).
    None means "derive" (see ``resolve``).
    """

    tile_k: int | None = None
    stages: int | None = None
    rotate: bool = True
    tile_major: bool = True
    persistent: bool | None = None
    ctas: int | None = None

    def resolve(self, block_k: int, head_dim: int, itemsize: int, kmax: int | None = None) -> "Tuning":
        """Every None derived; ``kmax``: width of the selection's id lists (None: unknown, not persistent)."""
        tile_k = self.tile_k or min(block_k, 128)
        if tile_k not in (64, 128) or block_k % tile_k:
            raise ValueError(f"Tuning.tile_k must be 64 or 128 and divide block_k={block_k}; got {tile_k}")
        persistent = self.persistent
        if persistent is None:
            persistent = kmax is not None and kmax * (block_k // tile_k) <= PERSISTENT_MAX_STEPS
        per_stage = 2 * tile_k * head_dim * itemsize + 4 * tile_k
        fixed = _q_bufs(persistent) * (TILE_Q * head_dim * itemsize + 4 * TILE_Q) + 4096
        stages = self.stages or max(2, min(4, (_SMEM_BYTES - fixed) // per_stage))
        if self.ctas is not None and (self.persistent is False or self.ctas < 1):
            raise ValueError(f"Tuning.ctas must be a positive int and not set with persistent=False; got {self.ctas}")
        if stages < 2:
            raise ValueError(f"Tuning.stages must be >= 2; got {stages}")
        if fixed + stages * per_stage > _SMEM_BYTES:
            raise ValueError(f"Tuning.stages={stages} needs more than {_SMEM_BYTES} bytes of shared memory")
        return dataclasses.replace(self, tile_k=tile_k, stages=stages, persistent=persistent)


def _q_bufs(persistent: bool) -> int:
    """Buffers of the forward's Q tile (which stages the output) and lse: the persistent forward loads the
    next item's Q beside the current one."""
    return 2 if persistent else 1


# Longest walk (tiles per row) on which ``Tuning.persistent=None`` picks the persistent forward: H200
# measurements at 32K/128K tokens, 0-95% sparsity (bench_sparse_mosaic_gpu_fwd_tune_h200.md): it won at
# 13-77 tiles at 32K and at 52 at 128K, lost at 103-512 tiles at 128K.
PERSISTENT_MAX_STEPS = 64

DEFAULT_TUNING = Tuning()


@dataclasses.dataclass(frozen=True)
class BwdTuning:
    """Static parameters of the Mosaic GPU backward (dq and dk/dv kernels).

    pingpong: the two consumer warpgroups alternate on the tensor cores through a schedule barrier.
      Off by default: on an H200 it made dq 10-19% slower and dk/dv no faster.
    dkv_stages: Q/dO ring depth of the dk/dv kernel (None: as many as fit, at most 4; 3 was slower).
    rotate: each CTA starts its walk at a different selected tile (the sums are order-free); on an
      H200 1.5-3.5% faster than walking every list from its start.
    tile_major: tiles vary fastest in the launch order (default); False: heads fastest (slower on an H200).
    """

    pingpong: bool = False
    dkv_stages: int | None = None
    rotate: bool = True
    tile_major: bool = True


DEFAULT_BWD_TUNING = BwdTuning()


def unsupported_reason(q_shape, k_shape, v_shape, dtype, block_q: int, block_k: int) -> str | None:
    """Why these shapes/dtype cannot run in the Mosaic GPU forward kernel, or None."""
    d = q_shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head dim must be one of {SUPPORTED_HEAD_DIMS} for mosaic_gpu; got {d}"
    if k_shape[-1] != d or v_shape[-1] != d:
        return f"q, k and v must share the head dim for mosaic_gpu; got {q_shape[-1]}, {k_shape[-1]}, {v_shape[-1]}"
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
        return f"dtype must be bfloat16 or float16 for mosaic_gpu (wgmma); got {jnp.dtype(dtype).name}"
    if block_q not in SUPPORTED_BLOCK_Q:
        return f"block_q must be one of {SUPPORTED_BLOCK_Q} for mosaic_gpu; got {block_q}"
    if block_k not in SUPPORTED_BLOCK_K:
        return f"block_k must be one of {SUPPORTED_BLOCK_K} for mosaic_gpu; got {block_k}"
    return None


def pack_selection(indices, counts):
    """[B, H, N, kmax] + [B, H, N] -> [B, H, N, 1 + kmax] int32: the count, then the ids."""
    return jnp.concatenate([counts[..., None].astype(jnp.int32), indices.astype(jnp.int32)], axis=-1)


# ----------------------------------------------------------------------------- pieces of all three kernels

# Shared-memory layout of every wgmma operand tile (8 x 64 tiles, 128-byte swizzle).
_SWIZZLED = {"transforms": (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))}


def _rows(positional: bool):
    """(ref, b, h, rows) -> the [rows, D] view of a [B, H, L, D] (block space) or [B, L, H, D] array."""
    if positional:
        return lambda ref, bb, hh, rows: ref.at[bb, rows, hh]
    return lambda ref, bb, hh, rows: ref.at[bb, hh, rows]


def _grid(heads: int, tiles: int, batch: int, tile_name: str, tile_major: bool):
    # Pallas launches its grid row-major: the last axis varies fastest (CUDA's x).
    if tile_major:
        return (heads, tiles, batch), ("heads", tile_name, "batch")
    return (tiles, heads, batch), (tile_name, "heads", "batch")


def _work_items(persistent: bool, num_ctas, heads: int, tiles: int, batch: int, tile_name: str, tile_major: bool):
    """(number of work items of this CTA, item(i) -> (batch, head, tile) of its i-th).

    One CTA per item: the grid's own indices. Persistent: a 1-D grid of ``num_ctas`` CTAs, CTA c taking
    items c, c + num_ctas, ... of the (batch, head, tile) space in launch order (tiles or heads fastest).
    """
    if not persistent:
        return 1, lambda i: (lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index(tile_name))
    cta = lax.axis_index("cta")
    n_mine = lax.div(jnp.int32(heads * tiles * batch - 1) - cta, jnp.int32(num_ctas)) + 1

    def item(i):
        w = cta + i * num_ctas
        first, second = (tiles, heads) if tile_major else (heads, tiles)
        a, rest = lax.rem(w, jnp.int32(first)), lax.div(w, jnp.int32(first))
        c, bb = lax.rem(rest, jnp.int32(second)), lax.div(rest, jnp.int32(second))
        return (bb, c, a) if tile_major else (bb, a, c)

    return n_mine, item


def _row_walks(persistent: bool, item, sel_ref, *, rows_per_sel: int, per_block: int, block_k: int, tile_k: int,
               rotate: bool):
    """walk(i) -> (b, h, q tile, steps, first key row of a step) of a CTA's i-th item over the forward list
    (one CTA per item: read once, up front)."""
    def walk_item(i):
        b, h, qt = item(i)
        srow = lax.div(qt, jnp.int32(rows_per_sel)) if rows_per_sel > 1 else qt
        steps = sel_ref[b, h, srow, 0] * per_block
        return b, h, qt, steps, functools.partial(_walk_tile_start, sel_ref, b, h, srow, qt, steps,
                                                  block_k=block_k, tile_k=tile_k, rotate=rotate)

    if persistent:
        return walk_item
    first = walk_item(0)
    return lambda i: first


def _produce_items(n_mine, walk, fill) -> None:
    """A persistent producer over the forward lists: ``fill(walk(i), step, n)`` for every step of each of
    the CTA's items in turn, ``n`` counting the ring's uses across items."""
    def produce(i, n):
        w = walk(i)

        def step(s, n):
            fill(w, s, n)
            return n + 1

        return lax.fori_loop(0, w[3], step, n)

    lax.fori_loop(0, n_mine, produce, jnp.int32(0))


def _bias_and_outputs(rest, masked: bool):
    """The kernel refs after the inputs: (key bias or None, outputs)."""
    return (rest[0], rest[1:]) if masked else (None, rest)


def _take_turn(turn):
    """Hand the tensor cores to the other consumer warpgroup and wait until they come back."""
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def _walk_tile_start(sel_ref, b, h, srow, cta, steps, step, *, block_k: int, tile_k: int, rotate: bool):
    """First key row of step ``step`` of a CTA's walk over its selected tiles. A rotated walk starts
    at a different tile per CTA (softmax and gradient sums do not care about order)."""
    if rotate:
        step = lax.rem(step + lax.rem(cta, jnp.maximum(steps, 1)), jnp.maximum(steps, 1))
    return triton_kernel._tile_start(lambda j: sel_ref[b, h, srow, 1 + j], step, block_k, tile_k)


def _load_own_tiles(copies, ready, wg):
    """A consumer warpgroup's own rows: one TMA copy per (source, shared-memory destination) pair, each
    on its own barrier (``i * CONSUMERS + wg``), then wait for all of them."""
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, ready.at[i * CONSUMERS + wg])
    for i in range(len(copies)):
        plgpu.barrier_wait(ready.at[i * CONSUMERS + wg])


def _run_warp_specialized(kernel, scratch, barriers):
    """Allocate the shared memory and barriers collectively over the warpgroups, then run ``kernel``."""
    pl.run_scoped(lambda *a: kernel(a[:len(scratch)], a[len(scratch):]), *scratch, *barriers, collective_axes="wg")


def _launch(body, out_type, grid_and_names, *, name: str, interpret: bool = False):
    """One CTA per grid point: CONSUMERS consumer warpgroups and one producer. ``name`` is the kernel's name
    in profilers (e.g. ``ncu --kernel-name regex:baatt_``)."""
    grid, names = grid_and_names
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=names,
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )


def _num_sms() -> int:
    """Streaming multiprocessors of the first GPU (132 on an H100/H200 SXM when there is none, e.g. when
    lowering on a CPU)."""
    if jax.default_backend() != "gpu":
        return 132
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def forward(q, k, v, sel, bias, *, scale: float, block_q: int, block_k: int, tuning: Tuning = DEFAULT_TUNING,
            positional: bool = False, interpret: bool = False):
    """out [B, Hq, Lq, D], lse [B, Hq, Lq] (natural log).

    sel: ``pack_selection(indices, counts)``. bias: float32 [B, Hkv, Lk] (0 valid,
    -inf masked; K/V rows already zeroed there) or None when every key is valid.
    positional: q/out are [B, Lq, Hq, D] and k/v [B, Lk, Hkv, D] (the caller's
      layout, no permutation): TMA reads strided rows, so no transpose is needed.
    ``tuning.persistent`` (derived from the walk length when None): one CTA per SM walks the work items (query tile, head, batch) cta, cta + #CTAs,
      ...; the K/V ring runs on across items and the next item's Q is loaded during the current one, so
      the per-item start (launch, first loads) and the output stores overlap the tensor-core work.
    """
    if positional:
        batch, lq, q_heads, d = q.shape
        _, lk, kv_heads, _ = k.shape
    else:
        batch, q_heads, lq, d = q.shape
        _, kv_heads, lk, _ = k.shape
    rows_of = _rows(positional)
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
    num_ctas = min(n_items, t.ctas or _num_sms()) if t.persistent else None
    q_bufs = _q_bufs(t.persistent)

    def body(q_ref, k_ref, v_ref, sel_ref, *rest):
        bias_ref, (out_ref, lse_ref) = _bias_and_outputs(rest, masked)
        n_mine, item = _work_items(t.persistent, num_ctas, q_heads, tiles, batch, "q_tile", t.tile_major)

        walk = _row_walks(t.persistent, item, sel_ref, rows_per_sel=rows_per_sel, per_block=per_block,
                          block_k=block_k, tile_k=tile_k, rotate=t.rotate)

        def ring_slot(n):
            return lax.rem(n, jnp.int32(stages))

        def kernel(scratch, barriers):
            q_smem, k_smem, v_smem, bias_smem, lse_smem = scratch
            k_ready, v_ready, q_ready, bias_ready, k_free, v_free, turn = barriers
            wg = lax.axis_index("wg")
            take_turn = functools.partial(_take_turn, turn)

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
                    b, h, qt, steps, _ = walk(i)
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
                    m = plgpu.layout_cast(jnp.full((WG_ROWS,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
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
                        if masked:
                            plgpu.barrier_wait(bias_ready.at[slot])
                            kb = plgpu.load(bias_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
                            s = s * qk_scale + lax.broadcast_in_dim(kb, s.shape, [1])
                            plgpu.barrier_arrive(k_free.at[slot])
                            m_new = jnp.maximum(m, s.max(axis=1))
                            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        else:
                            plgpu.barrier_arrive(k_free.at[slot])
                            # Scale folded into the exponent (one FMA per score), SPEC.md section 6.
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
                    _produce_items(n_mine, walk, lambda w, s, n: fill(w[4], w[0], kv_head(w[1]), s, ring_slot(n),
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
            plgpu.SMEM((q_bufs,) * t.persistent + (CONSUMERS, WG_ROWS, d), dtype, **_SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **_SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **_SWIZZLED),
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
        _run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, sel) + ((bias,) if masked else ())
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, q_heads, lq), jnp.float32))
    grid = ((num_ctas,), ("cta",)) if t.persistent else _grid(q_heads, tiles, batch, "q_tile", t.tile_major)
    return _launch(body, out_type, grid, name="baatt_block_sparse_fwd", interpret=interpret)(*inputs)


# ----------------------------------------------------------------------------- custom_vjp


def _run_backward(q, k, v, bias, indices, counts, out, lse, do, dlse, *, scale, block_q, block_k, backward_impl,
                  bwd_tuning=DEFAULT_BWD_TUNING):
    """Block-space gradients: the Mosaic GPU kernels, or the portable Pallas ones (block_k 64, or asked)."""
    if backward_impl == "mosaic_gpu" and block_k in SUPPORTED_BWD_BLOCK_K:
        return backward(q, k, v, bias, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                        block_k=block_k, tuning=bwd_tuning)
    if bias is None:
        bias = jnp.zeros(k.shape[:3], jnp.float32)
    t = triton_kernel.DEFAULT_TUNING.resolve(block_q, block_k, q.shape[-1])
    return triton_kernel._backward(q, k, v, bias, indices, counts, out, lse, do, dlse, scale=scale,
                                   block_q=block_q, block_k=block_k, tuning=t, interpret=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12, 13))
def _attend(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret, backward_impl,
            bwd_tuning):
    return _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret,
                       backward_impl, bwd_tuning)[0]


def _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret,
                backward_impl, bwd_tuning):
    if all_valid:
        kc, vc, bias = k, v, None
    else:
        kc, vc, bias = triton_kernel._sanitize(k, v, kv_valid)
    out, lse = forward(q, kc, vc, pack_selection(indices, counts), bias, scale=scale, block_q=block_q,
                       block_k=block_k, tuning=tuning, interpret=interpret)
    return (out, lse), (q, kc, vc, bias, indices, counts, out, lse)


def _attend_bwd(scale, block_q, block_k, tuning, all_valid, interpret, backward_impl, bwd_tuning, res, cts):
    # Gradients w.r.t. the sanitised K/V are exactly those w.r.t. K/V: masked rows get p = 0, so 0.
    q, kc, vc, bias, indices, counts, out, lse = res
    do, dlse = cts
    dq, dk, dv = _run_backward(q, kc, vc, bias, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                               block_k=block_k, backward_impl=backward_impl, bwd_tuning=bwd_tuning)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# Positional layout: no permutation, no key mask, lengths whole blocks. The forward reads and writes
# the caller's [B, L, H, D] arrays directly (saves four transposes of Q/K/V/out, SPEC.md section 7);
# the backward transposes into block space.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _attend_positional(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl, bwd_tuning):
    return _attend_positional_fwd(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl,
                                  bwd_tuning)[0]


def _attend_positional_fwd(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl, bwd_tuning):
    out, lse = forward(q, k, v, pack_selection(indices, counts), None, scale=scale, block_q=block_q,
                       block_k=block_k, tuning=tuning, positional=True)
    return (out, lse), (q, k, v, indices, counts, out, lse)


def _attend_positional_bwd(scale, block_q, block_k, tuning, backward_impl, bwd_tuning, res, cts):
    q, k, v, indices, counts, out, lse = res
    do, dlse = cts
    if backward_impl == "mosaic_gpu" and block_k in SUPPORTED_BWD_BLOCK_K:
        # The kernels read and write [B, L, H, D] directly: no transposes.
        dq, dk, dv = backward(q, k, v, None, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                              block_k=block_k, tuning=bwd_tuning, positional=True)
        return dq, dk, dv, None, None
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    dq, dk, dv = _run_backward(hm(q), hm(k), hm(v), None, indices, counts, hm(out), lse, hm(do), dlse, scale=scale,
                               block_q=block_q, block_k=block_k, backward_impl=backward_impl, bwd_tuning=bwd_tuning)
    return hm(dq), hm(dk), hm(dv), None, None


_attend_positional.defvjp(_attend_positional_fwd, _attend_positional_bwd)

BACKWARD_IMPLS = ("mosaic_gpu", "pallas")


def _check_backward_impl(backward_impl):
    if backward_impl not in BACKWARD_IMPLS:
        raise ValueError(f"backward_impl must be one of {BACKWARD_IMPLS}; got {backward_impl!r}")


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "backward_impl",
                                             "backward_tuning"))
def positional_attention(q, k, v, indices, counts, *, scale: float, block_q: int, block_k: int,
                         tuning: Tuning = DEFAULT_TUNING, backward_impl: str = "mosaic_gpu",
                         backward_tuning: BwdTuning = DEFAULT_BWD_TUNING):
    """Block-sparse attention on [B, L, H, D] inputs with an unpermuted selection and every key valid.

    q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] with Lq % block_q == 0 == Lk % block_k; returns out
    [B, Lq, Hq, D] and lse [B, Hq, Lq] (natural log). Differentiable in q, k, v; backward_impl
    "mosaic_gpu" (block_k 128/256; 64 uses the portable kernels) or "pallas".
    """
    if reason := unsupported_reason(q.shape, k.shape, v.shape, q.dtype, block_q, block_k):
        raise ValueError(reason)
    _check_backward_impl(backward_impl)
    if q.shape[1] % block_q or k.shape[1] % block_k:
        raise ValueError(f"positional_attention needs whole blocks: lengths {q.shape[1]}, {k.shape[1]} with "
                         f"block_q={block_q}, block_k={block_k}")
    return _attend_positional(q, k, v, indices.astype(jnp.int32), counts.astype(jnp.int32), float(scale),
                              block_q, block_k, tuning, backward_impl, backward_tuning)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "all_valid", "interpret",
                                             "backward_impl", "backward_tuning"))
def block_sparse_attention(q, k, v, kv_valid, indices, counts, *, scale: float, block_q: int, block_k: int,
                           tuning: Tuning = DEFAULT_TUNING, all_valid: bool = False, interpret: bool = False,
                           backward_impl: str = "mosaic_gpu", backward_tuning: BwdTuning = DEFAULT_BWD_TUNING):
    """Block-sparse attention in block space on Hopper; differentiable in q, k, v.

    Same contract as ``baatt.kernels.pallas_triton.block_sparse_attention``;
    ``all_valid=True`` promises that ``kv_valid`` is all True (no key mask, no
    padding) and compiles the kernels without the key bias.
    """
    if reason := unsupported_reason(q.shape, k.shape, v.shape, q.dtype, block_q, block_k):
        raise ValueError(reason)
    _check_backward_impl(backward_impl)
    return _attend(q, k, v, kv_valid, indices.astype(jnp.int32), counts.astype(jnp.int32), float(scale),
                   block_q, block_k, tuning, bool(all_valid), interpret, backward_impl, backward_tuning)


# ----------------------------------------------------------------------------- backward (Mosaic GPU)
#
# FA2-style split, both kernels warp specialised like the forward (a producer warpgroup streams
# tiles by index through a shared-memory ring, two consumer warpgroups run wgmma):
#   dq:    one CTA per 128 query rows, walking the forward list (K/V tiles);
#   dk/dv: one CTA per 128 key rows of a kv head, walking, for every query head of its GQA group,
#          the query blocks that selected its key block (the transposed list), Q/dO tiles of 64 rows.
# SPEC.md section 6: ds = p * (dp - delta), delta = rowsum(dO * O) (minus d lse).
# Scheduling inside a consumer warpgroup:
#   * both score products of a step (S = Q K^T and dP = dO V^T in dq; S^T and dP^T in dk/dv) are
#     issued back to back and awaited one by one (``wgmma_accumulator_load(wait_n=1)``), so the
#     exponentials of S overlap the dP product;
#   * the two gradient products of a dk/dv step (dV += P^T dO, dK += dS^T Q) are issued together
#     and awaited once;
#   * ``BwdTuning.pingpong`` (off by default, slower in dq on an H200): a schedule barrier makes the
#     two consumer warpgroups take turns on the tensor cores, as in the forward.
# Layouts: block space, or (``positional``) the caller's [B, L, H, D] q/k/v/dO and gradients, read
# and written by strided TMA (no transposes around the kernels).

BWD_TILE_Q = 64  # query rows per dk/dv step
SUPPORTED_BWD_BLOCK_K = (128, 256)


def _bwd_stages(per_stage: int, fixed: int) -> int:
    return max(2, min(3, (_SMEM_BYTES - fixed) // per_stage))  # dq: 2 stages of K/V fit beside Q and dO


def _dq_call(q, k, v, bias, sel, lse2, delta, do, *, scale, block_q, block_k, tile_k, positional, t: BwdTuning):
    if positional:
        batch, lq, q_heads, d = q.shape
        kv_heads = k.shape[2]
    else:
        batch, q_heads, lq, d = q.shape
        kv_heads = k.shape[1]
    rows_of = _rows(positional)
    group = q_heads // kv_heads
    dtype = q.dtype
    isz = jnp.dtype(dtype).itemsize
    per_block = block_k // tile_k
    rows_per_sel = block_q // TILE_Q
    masked = bias is not None
    qk_scale = float(scale) * LOG2E
    stages = _bwd_stages(2 * tile_k * d * isz + 4 * tile_k, 2 * TILE_Q * d * isz + 8 * TILE_Q + 4096)

    def body(q_ref, k_ref, v_ref, sel_ref, lse_ref, delta_ref, do_ref, *rest):
        bias_ref, (dq_ref,) = _bias_and_outputs(rest, masked)
        _, item = _work_items(False, None, q_heads, lq // TILE_Q, batch, "q_tile", t.tile_major)
        b, h, qt, steps, tile_start = _row_walks(False, item, sel_ref, rows_per_sel=rows_per_sel, per_block=per_block,
                                                 block_k=block_k, tile_k=tile_k, rotate=t.rotate)(0)

        def kernel(scratch, barriers):
            q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, bias_smem = scratch
            in_ready, k_ready, v_ready, bias_ready, k_free, v_free, turn = barriers
            wg = lax.axis_index("wg")
            take_turn = functools.partial(_take_turn, turn) if t.pingpong else (lambda: None)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                row0 = qt * TILE_Q + wg * WG_ROWS
                rows = pl.ds(row0, WG_ROWS)
                my_q, my_do = q_smem.at[wg], do_smem.at[wg]
                _load_own_tiles([(rows_of(q_ref, b, h, rows), my_q), (rows_of(do_ref, b, h, rows), my_do),
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
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **_SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **_SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32),
            plgpu.SMEM((stages, tile_k, d), dtype, **_SWIZZLED),
            plgpu.SMEM((stages, tile_k, d), dtype, **_SWIZZLED),
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
        _run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, sel, lse2, delta, do) + ((bias,) if masked else ())
    return _launch(body, jax.ShapeDtypeStruct(q.shape, dtype),
                   _grid(q_heads, lq // TILE_Q, batch, "q_tile", t.tile_major), name="baatt_block_sparse_dq")(*inputs)


def _dkv_call(q, k, v, bias, selt, lse2, delta, do, *, scale, block_q, block_k, positional, t: BwdTuning):
    batch, d = q.shape[0], q.shape[3]
    q_heads = q.shape[2] if positional else q.shape[1]
    lk, kv_heads = (k.shape[1], k.shape[2]) if positional else (k.shape[2], k.shape[1])
    rows_of = _rows(positional)
    group = q_heads // kv_heads
    dtype = q.dtype
    isz = jnp.dtype(dtype).itemsize
    tq = BWD_TILE_Q
    per_q = block_q // tq
    tiles_per_block = block_k // TILE_Q
    masked = bias is not None
    qk_scale = float(scale) * LOG2E
    per_stage, fixed = 2 * tq * d * isz + 8 * tq, 2 * TILE_Q * d * isz + 4 * TILE_Q + 4096
    stages = t.dkv_stages or max(2, min(4, (_SMEM_BYTES - fixed) // per_stage))
    if fixed + stages * per_stage > _SMEM_BYTES:
        raise ValueError(f"BwdTuning.dkv_stages={stages} needs more than {_SMEM_BYTES} bytes of shared memory")

    def body(q_ref, k_ref, v_ref, selt_ref, lse_ref, delta_ref, do_ref, *rest):
        bias_ref, (dk_ref, dv_ref) = _bias_and_outputs(rest, masked)
        b = lax.axis_index("batch")
        kvh = lax.axis_index("heads")
        kt = lax.axis_index("k_tile")
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
            wg = lax.axis_index("wg")
            take_turn = functools.partial(_take_turn, turn) if t.pingpong else (lambda: None)

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(232, action="increase")
                row0 = kt * TILE_Q + wg * WG_ROWS
                rows = pl.ds(row0, WG_ROWS)
                my_k, my_v = k_smem.at[wg], v_smem.at[wg]
                own = [(rows_of(k_ref, b, kvh, rows), my_k), (rows_of(v_ref, b, kvh, rows), my_v)]
                _load_own_tiles(own + ([(bias_ref.at[b, kvh, rows], kbias_smem.at[wg])] if masked else []),
                                own_ready, wg)
                kbias = plgpu.load(kbias_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1)) if masked else None
                zeros = plgpu.layout_cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                pl.when(wg == 1)(take_turn)  # warpgroup 1 starts one turn behind

                def step_fn(step, carry):
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
                    carry = lax.fori_loop(0, head_steps(g), step_fn, carry)
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
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **_SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS, d), dtype, **_SWIZZLED),
            plgpu.SMEM((CONSUMERS, WG_ROWS), jnp.float32) if masked else None,
            plgpu.SMEM((stages, tq, d), dtype, **_SWIZZLED),
            plgpu.SMEM((stages, tq, d), dtype, **_SWIZZLED),
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
        _run_warp_specialized(kernel, scratch, barriers)

    inputs = (q, k, v, selt, lse2, delta, do) + ((bias,) if masked else ())
    out_type = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    return _launch(body, out_type, _grid(kv_heads, lk // TILE_Q, batch, "k_tile", t.tile_major),
                   name="baatt_block_sparse_dkv")(*inputs)


def backward(q, k, v, bias, indices, counts, out, lse, do, dlse, *, scale, block_q, block_k,
             tuning: BwdTuning = DEFAULT_BWD_TUNING, positional: bool = False):
    """dq, dk, dv; bias None = every key valid.

    Block space (q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]), or with ``positional`` the caller's
    [B, L, H, D] arrays, which the kernels read and write by strided TMA.
    """
    do = do.astype(q.dtype)
    # d lse_i / d s_ij = p_ij, so a cotangent on lse folds into delta: ds = p * (dp - (delta - dlse)).
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if positional:
        delta = jnp.swapaxes(delta, 1, 2)  # [B, L, H] -> [B, H, L], like lse
    if dlse is not None:
        delta = delta - jnp.where(jnp.isneginf(lse), 0.0, dlse.astype(jnp.float32))
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)  # rows without keys: every p is 0
    nk = (k.shape[1] if positional else k.shape[2]) // block_k
    tile_k = min(block_k, 128)
    sel = pack_selection(indices, counts)
    indices_t, counts_t = triton_kernel.transpose_selection(indices, counts, nk)
    selt = pack_selection(indices_t, counts_t)
    dq = _dq_call(q, k, v, bias, sel, lse2, delta, do, scale=scale, block_q=block_q, block_k=block_k, tile_k=tile_k,
                  positional=positional, t=tuning)
    dk, dv = _dkv_call(q, k, v, bias, selt, lse2, delta, do, scale=scale, block_q=block_q, block_k=block_k,
                       positional=positional, t=tuning)
    return dq, dk, dv
