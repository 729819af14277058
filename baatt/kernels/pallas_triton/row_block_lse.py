"""Per-row, per-key-block log-sum-exp of a few query rows against every key, in portable Pallas (Triton lowering).

The GPU path of the ``pooled_query`` selector (``baatt.selection.pooled_query``), whose rows are the
mean queries of the query blocks:

    out[b, h, r, j] = log sum_{t in key block j, valid, t < limit[b, r]} exp(rows[b, h, r] . k[b, h', t] * scale)

(``-inf`` where no key of block ``j`` counts; ``h' = h // (Hq // Hkv)``). Not normalised: the caller
subtracts each row's log-sum-exp over the blocks, a [R, Nk] array.

Why a kernel: in XLA the [R, Lk] logits of every head are written to memory and read back for the
block reductions, ``4 * R * Lk`` bytes per head (17 GB at 128K tokens, 32 heads, block 128), many
times the matmul's own cost. Here a program holds a tile of rows, walks the key blocks and writes
one number per row and block: the logits never leave registers.

One program per (row tile, batch, query head); the key blocks past the tile's largest limit are
written as ``-inf`` without being read, those below its smallest limit go through without the
position test. Masked keys follow ``block_sparse.py``: zero K rows and a ``-inf`` key bias, added
before the max, so NaN stored at a masked key cannot reach the result; NaN at a valid visible key
makes its block's value NaN (it propagates, as in dense attention). Math in float32, base 2 inside
the kernel; bf16/f16 rows and keys go to the tensor cores as they are, float32 with
``Precision.HIGHEST``. Head dim 64 or 128; block_k a power of two in [16, 256].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from baatt.kernels.common import LN2, LOG2E, dot_precision, sanitize_masked_keys
from baatt.kernels.pallas_triton.block_sparse import unsupported_reason as _block_sparse_reason

ROW_TILE = 128  # rows per program (fewer when there are fewer rows, at least 16 for the tensor cores)
NUM_WARPS = 4


def unsupported_reason(rows_shape, k_shape, dtype, block_k: int) -> str | None:
    """Every rule these shapes break for this kernel, joined with "; ", or None."""
    return _block_sparse_reason(rows_shape, k_shape, k_shape, dtype, 16, block_k)


def _kernel(rows_ref, limit_ref, k_ref, bias_ref, o_ref, *, qk_scale, block_k, num_blocks, precision):
    rows = rows_ref[...]  # [tr, D]
    limit = limit_ref[...]  # [tr] int32: first key position each row may not see
    tr = rows.shape[0]

    def block(on_edge, j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        s = plgpu.dot(rows, k_ref[pl.ds(start, block_k), :], trans_b=True, precision=precision) * qk_scale
        s = s + bias_ref[pl.ds(start, block_k)][None, :]  # -inf at masked keys (their K rows are zero)
        if on_edge:  # a select, not a bias: NaN at a hidden key stays out
            k_pos = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(k_pos < limit[:, None], s, -jnp.inf)
        m = jnp.max(s, axis=1)
        # Tests of equality, not order: a NaN logit must reach the sum and the result, never turn into -inf.
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        total = jnp.sum(jnp.exp2(s - m_safe[:, None]), axis=1)
        o_ref[j, :] = jnp.where(total == 0.0, -jnp.inf, m_safe + jnp.log2(jnp.where(total == 0.0, 1.0, total)))
        return carry

    whole = jnp.minimum(jax.lax.div(jnp.min(limit), block_k), num_blocks)
    reach = jnp.minimum(jax.lax.div(jnp.max(limit) + block_k - 1, block_k), num_blocks)
    jax.lax.fori_loop(0, whole, functools.partial(block, False), jnp.int32(0))
    jax.lax.fori_loop(whole, reach, functools.partial(block, True), jnp.int32(0))

    def hidden(j, carry):
        o_ref[j, :] = jnp.full((tr,), -jnp.inf, jnp.float32)
        return carry

    jax.lax.fori_loop(reach, num_blocks, hidden, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "interpret", "row_tile", "num_warps"))
def row_block_logsumexp(rows, k, kv_valid, limits, *, scale: float, block_k: int, interpret: bool = False,
                        row_tile: int = ROW_TILE, num_warps: int = NUM_WARPS):
    """``out`` above, float32 [B, Hq, R, Nk] (natural log).

    Args:
      rows: [B, Hq, R, D] query rows (any R); k: [B, Hkv, Nk*block_k, D] keys in block space;
      kv_valid: bool [B, Hkv, Nk*block_k]; limits: int32 [B, R], the first key position each row may
      not see (``Nk * block_k`` or more: every key).
      row_tile, num_warps: rows per program (a power of two >= 16) and its warps. Every program reads
        all of its head's keys, so a larger tile reads K fewer times (tuning knobs; the defaults are
        the values the GPU tests ran).
    """
    if row_tile < 16 or row_tile & (row_tile - 1):
        raise ValueError(f"row_tile must be a power of two >= 16; got {row_tile}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16; got {num_warps}")
    if reason := unsupported_reason(rows.shape, k.shape, rows.dtype, block_k):
        raise ValueError(reason)
    if k.shape[2] % block_k:
        raise ValueError(f"k must hold whole key blocks; got {k.shape[2]} keys for block_k {block_k}")
    batch, q_heads, r, d = rows.shape
    _, kv_heads, lk, _ = k.shape
    if q_heads % kv_heads:
        raise ValueError(f"kv heads must divide query heads (GQA); got {kv_heads} kv heads for {q_heads} query heads")
    group, nk = q_heads // kv_heads, lk // block_k
    tr = min(row_tile, max(16, pl.next_power_of_2(r)))
    r_pad = -(-r // tr) * tr
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))
    limits = jnp.pad(limits.astype(jnp.int32), ((0, 0), (0, r_pad - r)))  # padding rows see nothing
    kc, bias = sanitize_masked_keys(kv_valid, k.astype(rows.dtype))
    kernel = functools.partial(_kernel, qk_scale=float(scale) * LOG2E, block_k=block_k, num_blocks=nk,
                               precision=dot_precision(rows.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(r_pad // tr, batch, q_heads),
        in_specs=[
            pl.BlockSpec((None, None, tr, d), lambda i, b, h: (b, h, i, 0)),
            pl.BlockSpec((None, tr), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, None, lk, d), lambda i, b, h: (b, h // group, 0, 0)),
            pl.BlockSpec((None, None, lk), lambda i, b, h: (b, h // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, nk, tr), lambda i, b, h: (b, h, 0, i)),
        out_shape=jax.ShapeDtypeStruct((batch, q_heads, nk, r_pad), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="baatt_row_block_lse",
    )(rows, limits, kc, bias)
    return jnp.swapaxes(out, 2, 3)[:, :, :r] * LN2
