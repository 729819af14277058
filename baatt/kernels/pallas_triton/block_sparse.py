"""Block-sparse flash attention in portable Pallas (Triton lowering), forward and backward.

Semantics: ``baatt.reference.attention.block_sparse_blocked``. Everything runs
in block space (``baatt.layout.BlockSpace``): q [B, Hq, Nq*bq, D], k/v
[B, Hkv, Nk*bk, D], kv_valid [B, Hkv, Nk*bk]; the selection is indices
[B, Hq, Nq, kmax] + counts [B, Hq, Nq].

Layout of the work:

* forward: one program per (query tile, batch, query head); the tile is the
  query block (or a power-of-two slice of it). The program reads its own row of
  the selection (count, then block ids) and loops ``count`` times, loading the
  key/value block at ``id * bk`` by a dynamic slice of the whole K/V of its kv
  head (``h // (Hq // Hkv)``: GQA without copying K/V). Online softmax in
  float32, base 2 (``exp2``), output + log-sum-exp (natural log).
* backward (FA2 style): ``delta = rowsum(dO * O)`` in XLA
  (``baatt.kernels.common.backward_row_terms``); a dq kernel over the
  forward list; a dk/dv kernel over the transposed list (for every key block,
  the query blocks that selected it), one program per (key tile, batch, kv
  head) that loops over the query heads of its GQA group, so dk/dv are summed
  over the group without atomics and without a [B, Hq, L, D] temporary.
* the transposed list is built on device (sort + scatter), see
  ``baatt.kernels.common.transpose_selection``.
* causal and block-causal masks (``mask``; rows and keys at their positions):
  ids ascend, so in the forward and dq lists the key blocks that a query
  block's first row sees whole come first and the tiles on the mask's edge
  last, and in the transposed list the edge comes first. XLA counts the whole
  blocks of each list (``seen_whole``, ``edge_first``); each kernel runs two
  loops, and only the edge loop compares positions (``hide_past_limit``).
  The forward's rotation of the walk stays within the whole blocks.

NaN safety: before the kernels, masked keys (kv_valid False) get their K/V
rows replaced by zeros with ``jnp.where`` (one XLA pass over K/V) and a key
bias of ``-inf`` (0 for valid keys) that is added to the logits
(``baatt.kernels.common.sanitize_masked_keys``); so NaN/Inf stored in masked
K/V cannot reach the output or the gradients, and the kernels keep K/V tiles
untouched between shared memory and the tensor cores.
Unselected blocks and the unused tail of an index list are never read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from baatt.attention_mask import BIDIRECTIONAL, AttentionMask
from baatt.kernels.common import (
    LN2,
    LOG2E,
    RUNNING_MAX_INIT,
    backward_row_terms,
    dot_precision,
    hide_past_limit,
    join_reasons,
    key_limit,
    pack_selection,
    sanitize_masked_keys,
    tile_start,
    transpose_selection,
)

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MIN_BLOCK, MAX_BLOCK = 16, 256


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Tile sizes and launch parameters (all static).

    fwd_q: query rows per forward program (<= block_q, divides it); fwd_k: key rows per inner step.
    dq_q: query rows per dq program; dq_k: key rows per inner step of dq.
    dkv_k: key rows per dk/dv program; dkv_q: query rows per inner step of dk/dv.
    fwd_rotate: each forward program starts its walk over the selected blocks at a different
      position (its tile index mod the count) and wraps around, so programs running at the same
      time read different K/V blocks (softmax is order-free; only rounding changes).
    None means "derive from the block sizes" (see ``resolve``).
    """

    fwd_q: int | None = None
    fwd_k: int | None = None
    fwd_warps: int | None = None
    fwd_stages: int = 2
    fwd_rotate: bool = True
    dq_q: int | None = None
    dq_k: int | None = None
    dkv_k: int | None = None
    dkv_q: int | None = None
    bwd_warps: int | None = None
    bwd_stages: int = 2

    def resolve(self, block_q: int, block_k: int, head_dim: int) -> Tuning:
        def pick(value, default, block):
            v = default if value is None else value
            v = min(v, block)
            if block % v:
                raise ValueError(f"tile {v} must divide block size {block}")
            return v

        fwd_q = pick(self.fwd_q, 128, block_q)
        return Tuning(
            fwd_q=fwd_q,
            fwd_k=pick(self.fwd_k, 128, block_k),
            fwd_warps=self.fwd_warps or (8 if fwd_q * head_dim >= 128 * 128 else 4),
            fwd_stages=self.fwd_stages,
            fwd_rotate=self.fwd_rotate,
            dq_q=pick(self.dq_q, 64, block_q),
            dq_k=pick(self.dq_k, 64, block_k),
            dkv_k=pick(self.dkv_k, 64, block_k),
            dkv_q=pick(self.dkv_q, 64, block_q),
            bwd_warps=self.bwd_warps or 4,
            bwd_stages=self.bwd_stages,
        )


DEFAULT_TUNING = Tuning()


def unsupported_reason(q_shape, k_shape, v_shape, dtype, block_q: int, block_k: int) -> str | None:
    """Every rule these shapes/dtype break for this kernel, joined with "; ", or None."""
    d = q_shape[-1]
    reasons = []
    if d not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim must be one of {SUPPORTED_HEAD_DIMS} for the pallas kernel; got {d}")
    if k_shape[-1] != d or v_shape[-1] != d:
        reasons.append(f"q, k and v must share the head dim for the pallas kernel; got {q_shape[-1]}, "
                       f"{k_shape[-1]}, {v_shape[-1]}")
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
        reasons.append(f"dtype must be bfloat16, float16 or float32 for the pallas kernel; got {jnp.dtype(dtype).name}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b & (b - 1) or not MIN_BLOCK <= b <= MAX_BLOCK:
            reasons.append(f"{name} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}] for the pallas kernel; "
                           f"got {b}")
    return join_reasons(*reasons)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(sel_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, scale, block_k, tk, precision,
                rotate, span):
    # sel row: [count, any selected block holds a masked key (0/1), block ids...]; under a causal mask
    # (span not None): [count, that flag, how many leading blocks the block's first row sees whole, ids...].
    count = sel_ref[0]
    q = q_ref[...]  # [tq, D]
    tq, d = q.shape
    qk_scale = scale * LOG2E
    first_id = 2 if span is None else 3
    first_row = pl.program_id(0) * tq

    steps = count * (block_k // tk)
    # Under a causal mask the walk over whole blocks comes first (ids ascend); the edge tiles follow it.
    walk = steps if span is None else sel_ref[2] * (block_k // tk)
    offset = jax.lax.rem(pl.program_id(0), jnp.maximum(walk, 1)) if rotate else None

    def body(masked, on_edge, t, carry):
        acc, m, l = carry
        if rotate and not on_edge:
            t = t + offset
            t = jnp.where(t >= walk, t - walk, t)
        start = pl.multiple_of(tile_start(lambda j: sel_ref[j + first_id], t, block_k, tk), tk)
        rows = pl.ds(start, tk)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale
        if masked:
            # bias: 0 for a valid key, -inf for a masked one (whose K/V rows were zeroed, so s is finite).
            s = s + bias_ref[rows][None, :]
        if on_edge:
            s = hide_past_limit(s, first_row, start, span)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    init = (
        jnp.zeros((tq, d), jnp.float32),
        jnp.full((tq,), RUNNING_MAX_INIT, jnp.float32),
        jnp.zeros((tq,), jnp.float32),
    )
    # Rows whose selected blocks are all fully valid (the common case) skip the bias add.
    acc, m, l = jax.lax.cond(
        sel_ref[1] != 0,
        lambda: jax.lax.fori_loop(0, walk, functools.partial(body, True, False), init),
        lambda: jax.lax.fori_loop(0, walk, functools.partial(body, False, False), init),
    )
    if span is not None:
        acc, m, l = jax.lax.fori_loop(walk, steps, functools.partial(body, True, True), (acc, m, l))
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    o_ref[...] = jnp.where(has[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def _pack_forward_selection(indices, counts, kv_valid, block_q, block_k, span):
    """[B, Hq, Nq, 2 + kmax]: count, whether any selected block holds a masked key, then the ids; under a
    causal mask [B, Hq, Nq, 3 + kmax], with the number of leading kept blocks seen whole before the ids."""
    batch, q_heads, nq, kmax = indices.shape
    kv_heads = kv_valid.shape[1]
    partial = ~jnp.all(kv_valid.reshape(batch, kv_heads, -1, block_k), axis=-1)  # [B, Hkv, Nk]
    partial = jnp.repeat(partial, q_heads // kv_heads, axis=1)[:, :, None, :]
    partial = jnp.broadcast_to(partial, (batch, q_heads, nq, partial.shape[-1]))
    hit = jnp.take_along_axis(partial, indices, axis=-1) & (jnp.arange(kmax) < counts[..., None])
    flag = jnp.any(hit, axis=-1).astype(jnp.int32)
    head = [counts[..., None].astype(jnp.int32), flag[..., None]]
    if span is not None:
        head.append(seen_whole(indices, counts, block_q, block_k, span)[..., None])
    return jnp.concatenate([*head, indices.astype(jnp.int32)], axis=-1)


def seen_whole(indices, counts, block_q: int, block_k: int, span: int):
    """int32 [B, H, Nq]: how many of the kept key blocks (ascending ids) the first row of the query block,
    hence every row of it, sees whole under a causal mask of span ``span``; the rest need the mask."""
    nq, kmax = indices.shape[-2:]
    limit = key_limit(jnp.arange(nq, dtype=jnp.int32) * block_q, span)  # [Nq]
    whole = ((indices + 1) * block_k <= limit[:, None]) & (jnp.arange(kmax) < counts[..., None])
    return jnp.sum(whole, axis=-1, dtype=jnp.int32)


def edge_first(indices_t, counts_t, block_q: int, block_k: int, span: int):
    """int32 [B, H, Nk]: how many of the query blocks (ascending ids) that kept each key block do not see
    all of it under a causal mask of span ``span``: they come first in the transposed list."""
    nk, nq = indices_t.shape[-2:]
    end = (jnp.arange(nk, dtype=jnp.int32) + 1) * block_k  # [Nk]
    cut = (key_limit(indices_t * block_q, span) < end[:, None]) & (jnp.arange(nq) < counts_t[..., None])
    return jnp.sum(cut, axis=-1, dtype=jnp.int32)


def _forward(q, k, v, bias, sel, *, scale, block_q, block_k, tuning, interpret, span):
    batch, q_heads, lq, d = q.shape
    _, kv_heads, lk, _ = k.shape
    group = q_heads // kv_heads
    tq = tuning.fwd_q
    per_block = block_q // tq
    width = sel.shape[-1]
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, tk=tuning.fwd_k,
                               precision=dot_precision(q.dtype), rotate=tuning.fwd_rotate, span=span)
    grid = (lq // tq, batch, q_heads)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h, i // per_block, 0)),
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk), lambda i, b, h: (b, h // group, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, q_heads, lq), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.fwd_warps, num_stages=tuning.fwd_stages),
        interpret=interpret,
        name="baatt_block_sparse_fwd",
    )(sel, q, k, v, bias)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(sel_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref, dq_ref, *,
               scale, block_k, tk, precision, span):
    # sel row: [count, block ids...]; under a causal mask [count, leading blocks seen whole, block ids...].
    count = sel_ref[0]
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]  # base-2 lse, +inf for rows without keys
    delta = delta_ref[...]
    qk_scale = scale * LOG2E
    first_id = 1 if span is None else 2
    first_row = pl.program_id(0) * q.shape[0]

    def body(on_edge, t, dq):
        base = pl.multiple_of(tile_start(lambda j: sel_ref[j + first_id], t, block_k, tk), tk)
        rows = pl.ds(base, tk)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale + bias_ref[rows][None, :]
        if on_edge:
            s = hide_past_limit(s, first_row, base, span)
        p = jnp.exp2(s - lse2[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    dq = jnp.zeros(q.shape, jnp.float32)
    steps = count * (block_k // tk)
    if span is None:
        dq = jax.lax.fori_loop(0, steps, functools.partial(body, False), dq)
    else:  # the blocks seen whole, then the edge tiles
        whole = sel_ref[1] * (block_k // tk)
        dq = jax.lax.fori_loop(0, whole, functools.partial(body, False), dq)
        dq = jax.lax.fori_loop(whole, steps, functools.partial(body, True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(selt_ref, k_ref, v_ref, bias_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, block_q, tq, group, precision, span):
    # selt row (per query head of the group): [count, query block ids...]; under a causal mask
    # [count, leading query blocks that do not see the whole key block, query block ids...].
    k = k_ref[...]
    v = v_ref[...]
    bias = bias_ref[...][None, :]  # [1, tk]
    qk_scale = scale * LOG2E
    steps = block_q // tq
    first_id = 1 if span is None else 2
    first_key = pl.program_id(0) * k.shape[0]

    def head(g, carry):
        count = selt_ref[g, 0]

        def body(on_edge, t, carry):
            dk, dv = carry
            base = pl.multiple_of(tile_start(lambda j: selt_ref[g, j + first_id], t, block_q, tq), tq)
            rows = pl.ds(base, tq)
            q = q_ref[g, rows, :]
            do = do_ref[g, rows, :]
            lse2 = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale + bias  # [tq, tk]
            if on_edge:
                s = hide_past_limit(s, base, first_key, span)
            p = jnp.exp2(s - lse2[:, None])
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            dp = plgpu.dot(do, v, trans_b=True, precision=precision)
            ds = p * (dp - delta[:, None])
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
            return dk, dv

        if span is None:
            return jax.lax.fori_loop(0, count * steps, functools.partial(body, False), carry)
        # Query blocks ascend: those on the mask's edge come first, then those that see the key block whole.
        edge = selt_ref[g, 1] * steps
        carry = jax.lax.fori_loop(0, edge, functools.partial(body, True), carry)
        return jax.lax.fori_loop(edge, count * steps, functools.partial(body, False), carry)

    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, bias, indices, counts, out, lse, do, dlse, *, scale: float, block_q: int, block_k: int,
             tuning: Tuning, interpret: bool = False, span: int | None = None):
    """dq, dk, dv in block space from the forward's out and lse (and the cotangents do, dlse).

    k, v: the sanitised K/V (masked rows zeroed) and bias their float32 key bias
    (``baatt.kernels.common.sanitize_masked_keys``); tuning: resolved
    (``Tuning.resolve``); span: that of the causal mask (``AttentionMask.span``), None
    when bidirectional. Also the fallback of the Mosaic GPU backward.
    """
    batch, q_heads, lq, d = q.shape
    _, kv_heads, lk, _ = k.shape
    group = q_heads // kv_heads
    nk = lk // block_k
    precision = dot_precision(q.dtype)
    do, delta, lse2 = backward_row_terms(out, lse, do, dlse)
    sel = pack_selection(indices, counts)
    if span is not None:
        sel = jnp.concatenate([sel[..., :1], seen_whole(indices, counts, block_q, block_k, span)[..., None],
                               sel[..., 1:]], axis=-1)
    width = sel.shape[-1]

    # dq over the forward list.
    tq, tk = tuning.dq_q, tuning.dq_k
    per_block = block_q // tq
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k, tk=tk, precision=precision, span=span),
        grid=(lq // tq, batch, q_heads),
        in_specs=[
            pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, h, i // per_block, 0)),
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk), lambda i, b, h: (b, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.bwd_warps, num_stages=tuning.bwd_stages),
        interpret=interpret,
        name="baatt_block_sparse_dq",
    )(sel, q, do, lse2, delta, k, v, bias)

    # dk, dv over the transposed list.
    indices_t, counts_t = transpose_selection(indices, counts, nk)
    selt = pack_selection(indices_t, counts_t)  # [B, Hq, Nk, 1 + Nq]
    if span is not None:
        selt = jnp.concatenate([selt[..., :1], edge_first(indices_t, counts_t, block_q, block_k, span)[..., None],
                                selt[..., 1:]], axis=-1)
    width_t = selt.shape[-1]
    tk, tq = tuning.dkv_k, tuning.dkv_q
    per_block = block_k // tk
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q, tq=tq, group=group, precision=precision,
                          span=span),
        grid=(lk // tk, batch, kv_heads),
        in_specs=[
            pl.BlockSpec((None, group, None, width_t), lambda i, b, h: (b, h, i // per_block, 0)),
            pl.BlockSpec((None, None, tk, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tk, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tk), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, group, lq, d), lambda i, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, group, lq, d), lambda i, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, group, lq), lambda i, b, h: (b, h, 0)),
            pl.BlockSpec((None, group, lq), lambda i, b, h: (b, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, tk, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tk, d), lambda i, b, h: (b, h, i, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.bwd_warps, num_stages=tuning.bwd_stages),
        interpret=interpret,
        name="baatt_block_sparse_dkv",
    )(selt, k, v, bias, q, do, lse2, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp


def first_order_only(implementation: str, *arrays):
    """``arrays`` unchanged; differentiating through them raises a ``NotImplementedError``.

    The custom VJPs pass their forward inputs and their backward's residuals and
    cotangents through this. A second derivative (grad of grad, ``jax.hessian``, a jvp
    of a gradient) would otherwise trace the forward or backward kernels under JVP,
    which Pallas kernels do not support: it failed with a bare AssertionError.
    """
    return _first_order_only(implementation, arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_only(implementation, arrays):
    return arrays


@_first_order_only.defjvp
def _refuse_second_order(implementation, primals, tangents):
    raise NotImplementedError(
        f"second-order derivatives (grad of grad, jax.hessian, jvp of a gradient) are not supported by "
        f"implementation {implementation!r}: its kernels have a first derivative only; use "
        "implementation='reference' for higher-order derivatives"
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _attend(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, interpret, span):
    return _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, interpret, span)[0]


def _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, interpret, span):
    q, k, v = first_order_only("pallas", q, k, v)
    kc, vc, bias = sanitize_masked_keys(kv_valid, k, v)
    sel = _pack_forward_selection(indices, counts, kv_valid, block_q, block_k, span)
    out, lse = _forward(q, kc, vc, bias, sel, scale=scale, block_q=block_q, block_k=block_k,
                        tuning=tuning, interpret=interpret, span=span)
    return (out, lse), (q, kc, vc, bias, indices, counts, out, lse)


def _attend_bwd(scale, block_q, block_k, tuning, interpret, span, res, cts):
    # Gradients w.r.t. the sanitised K/V are exactly those w.r.t. K/V: masked rows get p = 0, so 0.
    res, cts = first_order_only("pallas", res, cts)
    q, kc, vc, bias, indices, counts, out, lse = res
    do, dlse = cts
    dq, dk, dv = backward(q, kc, vc, bias, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                          block_k=block_k, tuning=tuning, interpret=interpret, span=span)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "interpret", "mask"))
def block_sparse_attention(q, k, v, kv_valid, indices, counts, *, scale: float, block_q: int, block_k: int,
                           tuning: Tuning = DEFAULT_TUNING, interpret: bool = False,
                           mask: AttentionMask = BIDIRECTIONAL):
    """Block-sparse attention in block space; differentiable in q, k, v.

    Args:
      q: [B, Hq, Nq*block_q, D]; k, v: [B, Hkv, Nk*block_k, D]; kv_valid: bool [B, Hkv, Nk*block_k].
      indices: int32 [B, Hq, Nq, kmax]; counts: int32 [B, Hq, Nq].
      mask: the attention mask (static; rows and keys sit at their positions). Under a causal one the
        kept blocks a query block's first row sees whole run unmasked and only the remaining tiles,
        those on the mask's edge, hide the keys past each row's limit.

    Returns:
      out [B, Hq, Nq*block_q, D] in q's dtype, lse [B, Hq, Nq*block_q] float32 (natural log; -inf
      for rows that see no valid key, whose output is 0).
    """
    if reason := unsupported_reason(q.shape, k.shape, v.shape, q.dtype, block_q, block_k):
        raise ValueError(reason)
    tuning = tuning.resolve(block_q, block_k, q.shape[-1])
    return _attend(q, k, v, kv_valid, indices.astype(jnp.int32), counts.astype(jnp.int32), float(scale),
                   block_q, block_k, tuning, interpret, mask.span)

