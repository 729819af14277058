"""The oracle post-downsample map ``M_hat`` (docs/spec.md section 1) in portable Pallas (Triton lowering).

Semantics: ``baatt.reference.downsample.post_downsample_map`` (and, in block
space, ``post_downsample_blocked``):

    M_hat[b, h, a, j] = (1/|I(a)|) * sum_{i in I(a), real} sum_{t in J(j), valid} exp(l_it - lse_i)

with ``l = q.k * scale`` per query head (kv head ``h // (Hq // Hkv)``), in
block space (``baatt.layout.BlockSpace``). Output [B, Hq, Nq, Nk] float32.

Two streaming passes, never an L x L array; memory is linear in L (plus the
[B, Hq, Nq, Nk] output itself):

1. ``_lse_kernel``: each row's log-sum-exp over all valid keys. A small
   kernel of its own rather than ``block_sparse_attention`` with a dense
   selection: the dense-selection route would also read V and do the P @ V
   product, i.e. twice the matmul work and 1.5x the HBM traffic of this pass,
   and then throw the output away. This kernel is the forward loop minus V.
2. ``_map_kernel``: one program per (query tile, batch, query head); a loop
   over every key block ``j`` (inner loop over the key tiles of the block)
   computes ``p = exp2(s - lse2)`` for the tile, sums it over keys and over the
   real rows of the tile, and writes one number per key block. A query block
   split into several tiles (``Tuning.q < block_q``) gets one partial row per
   tile; XLA sums the partials and divides by the number of real rows.

Masking (NaN safe, never by multiplication): before the kernels, masked keys
(kv_valid False) get their K rows replaced by zeros with ``jnp.where`` and a key
bias of ``-inf`` (0 for valid keys) added to the logits, as in
``block_sparse.py`` (``baatt.kernels.common.sanitize_masked_keys``); rows that
are padding (q_valid False) or see no valid key get ``lse2 = +inf`` (so every
``p`` of theirs is ``exp2(-inf) = 0``) and their per-row sums are dropped with
``where`` inside the kernel, so NaN stored in padded query rows or masked keys
cannot reach ``M_hat``.

Causal and block-causal masks (``mask``, static): a query tile walks the key
tiles up to the last one its last row may see; the tiles wholly visible to its
first row go through unmasked, the few on the mask's edge get ``-inf`` logits
where a key lies past a row's limit (``baatt.attention_mask``), and the key
blocks past the tile's reach are written as 0 without being read.

Math in float32, base 2 (``exp2``) inside the kernels; bf16/f16 inputs go to
the tensor cores as they are (exact products, float32 accumulation), float32
inputs with ``Precision.HIGHEST`` (no tf32). Supported like the sparse kernel:
head dim 64 or 128, bfloat16 / float16 / float32, block sizes powers of two in
[16, 256], GQA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from baatt import layout, platform
from baatt.attention_mask import BIDIRECTIONAL, AttentionMask, resolve_mask
from baatt.kernels.common import (
    LN2,
    LOG2E,
    RUNNING_MAX_INIT,
    dot_precision,
    hide_past_limit,
    key_limit,
    sanitize_masked_keys,
)
from baatt.kernels.pallas_triton.block_sparse import unsupported_reason
from baatt.validation import check_qk


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Tile sizes and launch parameters of both passes (all static).

    q: query rows per program (divides block_q; <= block_q); k: key rows per inner step (divides block_k).
    warps: Triton warps per program (None: 8 when q * head_dim >= 128 * 128, else 4); stages: pipeline depth.
    """

    q: int | None = None
    k: int | None = None
    warps: int | None = None
    stages: int = 2

    def resolve(self, block_q: int, block_k: int, head_dim: int) -> Tuning:
        def pick(value, default, block):
            v = min(default if value is None else value, block)
            if v < 1 or block % v:
                raise ValueError(f"tile {v} must divide block size {block}")
            return v

        tq = pick(self.q, 128, block_q)
        return Tuning(q=tq, k=pick(self.k, 128, block_k),
                      warps=self.warps or (8 if tq * head_dim >= 128 * 128 else 4), stages=self.stages)


DEFAULT_TUNING = Tuning()


# ----------------------------------------------------------------------------- kernels


def _lse_kernel(q_ref, k_ref, bias_ref, lse2_ref, *, qk_scale, tk, num_tiles, precision, span):
    """Base-2 log-sum-exp of each row of the tile over all keys it may see (-inf for a row that sees none)."""
    q = q_ref[...]  # [tq, D]
    tq = q.shape[0]
    first_row = pl.program_id(0) * tq

    def body(on_edge, t, carry):
        m, l = carry
        start = pl.multiple_of(t * tk, tk)
        rows = pl.ds(start, tk)
        s = plgpu.dot(q, k_ref[rows, :], trans_b=True, precision=precision) * qk_scale
        s = s + bias_ref[rows][None, :]  # -inf at masked keys (their K rows are zero, so s was finite)
        if on_edge:
            s = hide_past_limit(s, first_row, start, span)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        l = l * jnp.exp2(m - m_new) + jnp.sum(jnp.exp2(s - m_new[:, None]), axis=1)
        return m_new, l

    init = (jnp.full((tq,), RUNNING_MAX_INIT, jnp.float32), jnp.zeros((tq,), jnp.float32))
    if span is None:
        m, l = jax.lax.fori_loop(0, num_tiles, functools.partial(body, False), init)
    else:
        # Tiles wholly visible to the first row, then those up to the last row's reach.
        whole = jnp.minimum(jax.lax.div(key_limit(first_row, span), tk), num_tiles)
        reach = jnp.minimum(jax.lax.div(key_limit(first_row + tq - 1, span) + tk - 1, tk), num_tiles)
        carry = jax.lax.fori_loop(0, whole, functools.partial(body, False), init)
        m, l = jax.lax.fori_loop(whole, reach, functools.partial(body, True), carry)
    has = l > 0.0
    lse2_ref[...] = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), -jnp.inf)


def _map_kernel(q_ref, lse2_ref, k_ref, bias_ref, o_ref, *, qk_scale, block_k, tk, num_blocks, precision, span):
    """o[j] = sum over the tile's live rows and block j's valid keys (those each row may see) of exp2(s - lse2)."""
    q = q_ref[...]  # [tq, D]
    lse2 = lse2_ref[...]  # [tq]: +inf for padding rows and rows without keys
    live = lse2 < jnp.inf
    tq = q.shape[0]
    steps = block_k // tk
    first_row = pl.program_id(0) * tq

    def tile(on_edge, start, acc):
        start = pl.multiple_of(start, tk)
        rows = pl.ds(start, tk)
        s = plgpu.dot(q, k_ref[rows, :], trans_b=True, precision=precision) * qk_scale
        s = s + bias_ref[rows][None, :]
        if on_edge:
            s = hide_past_limit(s, first_row, start, span)
        p = jnp.exp2(s - lse2[:, None])  # 0 at masked keys, hidden keys and dead rows
        return acc + jnp.sum(p, axis=1)

    def block(on_edge, j, carry):
        base = j * block_k
        zero = jnp.zeros((tq,), jnp.float32)
        if steps == 1:
            acc = tile(on_edge, base, zero)
        else:
            acc = jax.lax.fori_loop(0, steps, lambda u, a: tile(on_edge, base + u * tk, a), zero)
        o_ref[j] = jnp.sum(jnp.where(live, acc, 0.0))  # where, not a product: NaN rows stay out
        return carry

    if span is None:
        jax.lax.fori_loop(0, num_blocks, functools.partial(block, False), jnp.int32(0))
        return
    # Blocks wholly visible to the first row, those up to the last row's reach, then zeros.
    whole = jnp.minimum(jax.lax.div(key_limit(first_row, span), block_k), num_blocks)
    reach = jnp.minimum(jax.lax.div(key_limit(first_row + tq - 1, span) + block_k - 1, block_k), num_blocks)
    jax.lax.fori_loop(0, whole, functools.partial(block, False), jnp.int32(0))
    jax.lax.fori_loop(whole, reach, functools.partial(block, True), jnp.int32(0))

    def hidden(j, carry):
        o_ref[j] = jnp.float32(0.0)
        return carry

    jax.lax.fori_loop(reach, num_blocks, hidden, jnp.int32(0))


# ----------------------------------------------------------------------------- passes


def _row_lse2(q, kc, bias, *, scale, tuning, interpret, span=None):
    batch, q_heads, lq, d = q.shape
    _, kv_heads, lk, _ = kc.shape
    group = q_heads // kv_heads
    tq, tk = tuning.q, tuning.k
    kernel = functools.partial(_lse_kernel, qk_scale=scale * LOG2E, tk=tk, num_tiles=lk // tk,
                               precision=dot_precision(q.dtype), span=span)
    return pl.pallas_call(
        kernel,
        grid=(lq // tq, batch, q_heads),
        in_specs=[
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk), lambda i, b, h: (b, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i)),
        out_shape=jax.ShapeDtypeStruct((batch, q_heads, lq), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.warps, num_stages=tuning.stages),
        interpret=interpret,
        name="baatt_oracle_lse",
    )(q, kc, bias)


def _tile_mass(q, lse2, kc, bias, *, scale, block_k, tuning, interpret, span=None):
    """[B, Hq, Lq/tq, Nk]: per query tile and key block, the summed probability of the tile's live rows."""
    batch, q_heads, lq, d = q.shape
    _, kv_heads, lk, _ = kc.shape
    group = q_heads // kv_heads
    tq, tk = tuning.q, tuning.k
    nk = lk // block_k
    kernel = functools.partial(_map_kernel, qk_scale=scale * LOG2E, block_k=block_k, tk=tk, num_blocks=nk,
                               precision=dot_precision(q.dtype), span=span)
    return pl.pallas_call(
        kernel,
        grid=(lq // tq, batch, q_heads),
        in_specs=[
            pl.BlockSpec((None, None, tq, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk), lambda i, b, h: (b, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, nk), lambda i, b, h: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, q_heads, lq // tq, nk), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.warps, num_stages=tuning.stages),
        interpret=interpret,
        name="baatt_oracle_map",
    )(q, lse2, kc, bias)


def _check_block_space(q, k, block_q, block_k):
    if reason := unsupported_reason(q.shape, k.shape, k.shape, q.dtype, block_q, block_k):
        raise ValueError(reason)
    if q.shape[2] % block_q or k.shape[2] % block_k:
        raise ValueError(f"block-space lengths must be whole blocks; got {q.shape[2]} rows for block_q {block_q} "
                         f"and {k.shape[2]} keys for block_k {block_k}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads must divide query heads (GQA); got {k.shape[1]} kv heads for "
                         f"{q.shape[1]} query heads")


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "interpret", "mask"))
def row_logsumexp(q, k, kv_valid, *, scale: float, block_q: int, block_k: int,
                  tuning: Tuning = DEFAULT_TUNING, interpret: bool = False,
                  mask: AttentionMask = BIDIRECTIONAL) -> jax.Array:
    """Pass 1 alone, in block space: each row's natural-log log-sum-exp over all valid keys it may see.

    Args:
      q: [B, Hq, Nq*block_q, D]; k: [B, Hkv, Nk*block_k, D]; kv_valid: bool [B, Hkv, Nk*block_k].
      mask: the attention mask (static; rows and keys at their positions).

    Returns:
      float32 [B, Hq, Nq*block_q] (``-inf`` for a row that sees no valid key);
      semantics of ``baatt.reference.downsample.row_logsumexp``.
    """
    _check_block_space(q, k, block_q, block_k)
    tuning = tuning.resolve(block_q, block_k, q.shape[-1])
    kc, bias = sanitize_masked_keys(kv_valid, k)
    return _row_lse2(q, kc, bias, scale=float(scale), tuning=tuning, interpret=interpret, span=mask.span) * LN2


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "interpret", "mask"))
def post_downsample_blocked(q, k, kv_valid, q_valid, *, scale: float, block_q: int, block_k: int,
                            tuning: Tuning = DEFAULT_TUNING, interpret: bool = False,
                            mask: AttentionMask = BIDIRECTIONAL) -> jax.Array:
    """The oracle map in block space, [B, Hq, Nq, Nk] float32 (both passes).

    Args:
      q: [B, Hq, Nq*block_q, D]; k: [B, Hkv, Nk*block_k, D]; kv_valid: bool [B, Hkv, Nk*block_k];
      q_valid: bool [B, Nq*block_q] (False = padding rows, which count for nothing).
      mask: the attention mask (static; rows and keys at their positions).

    Semantics of ``baatt.reference.downsample.post_downsample_blocked``: each row
    ``a`` averages, over the real rows of query block ``a``, their attention mass
    on each key block; a query block without real rows is all zeros.
    """
    _check_block_space(q, k, block_q, block_k)
    tuning = tuning.resolve(block_q, block_k, q.shape[-1])
    scale = float(scale)
    batch, q_heads, lq, _ = q.shape
    kc, bias = sanitize_masked_keys(kv_valid, k)
    lse2 = _row_lse2(q, kc, bias, scale=scale, tuning=tuning, interpret=interpret, span=mask.span)
    # Dead rows (padding, or no valid key) get +inf: every p of theirs is exp2(-inf) = 0.
    dead = ~q_valid[:, None, :] | ~(lse2 > -jnp.inf)
    lse2 = jnp.where(dead, jnp.inf, lse2)
    mass = _tile_mass(q, lse2, kc, bias, scale=scale, block_k=block_k, tuning=tuning, interpret=interpret,
                      span=mask.span)
    nq = lq // block_q
    mass = jnp.sum(mass.reshape(batch, q_heads, nq, block_q // tuning.q, -1), axis=3)
    real = jnp.sum(q_valid.reshape(batch, nq, block_q), axis=-1).astype(jnp.float32)  # [B, Nq]
    return mass / jnp.maximum(real, 1.0)[:, None, :, None]


# ----------------------------------------------------------------------------- public entry point


def post_downsample_map(
    q, k, *, block_size: int, block_size_k: int | None = None, key_mask=None, q_perm=None, k_perm=None,
    scale: float | None = None, tuning: Tuning = DEFAULT_TUNING, interpret: bool = False,
    is_causal: bool = False, mask: AttentionMask | None = None,
) -> jax.Array:
    """The oracle ``M_hat`` [B, Hq, Nq, Nk] float32 (docs/spec.md section 1), computed by the Pallas kernels.

    Same arguments and result as ``baatt.reference.post_downsample_map``: q
    [B, Lq, Hq, D], k [B, Lk, Hkv, D] (Hkv divides Hq), ``key_mask`` bool [B, Lk]
    (True = real key), ``q_perm`` / ``k_perm`` from ``norm_sort`` for a sorted
    block space, ``is_causal`` / ``mask`` the attention mask; each row of the
    result sums to 1. ``interpret=True`` runs the kernels in Pallas interpret
    mode (any backend; slow, for tests).

    Raises:
      ValueError: invalid inputs (``check_qk``), or shapes / dtype / block sizes
        outside what the kernel supports (the message names the rule), or no
        CUDA GPU while ``interpret`` is False.
    """
    check_qk(q, k, key_mask=key_mask)
    mask = resolve_mask(is_causal, mask)
    for name, value in (("block_size", block_size), ("block_size_k", block_size_k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    block_k = block_size if block_size_k is None else block_size_k
    if reason := unsupported_reason(q.shape, k.shape, k.shape, q.dtype, block_size, block_k):
        raise ValueError(reason)
    if not interpret and not platform.has_gpu():
        raise ValueError("no CUDA GPU found; pass interpret=True to run the Pallas kernel in interpret mode "
                         "(slow, for tests)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _post_map_jit(q, k, key_mask, q_perm, k_perm, block_size, block_k, scale, tuning, interpret, mask)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10))
def _post_map_jit(q, k, key_mask, q_perm, k_perm, block_q, block_k, scale, tuning, interpret, mask):
    space = layout.to_block_space(
        q, k, None, block_q=block_q, block_k=block_k, key_mask=key_mask, q_perm=q_perm, k_perm=k_perm, mask=mask
    )
    return post_downsample_blocked(space.q, space.k, space.kv_valid, space.q_valid, scale=scale,
                                   block_q=block_q, block_k=block_k, tuning=tuning, interpret=interpret,
                                   mask=mask)
