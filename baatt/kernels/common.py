"""What every kernel backend shares: softmax constants, key masking, selection lists, backward row terms.

Everything here runs in XLA around the kernels (or is traced into them, like
``tile_start``); the Pallas Triton and the Mosaic GPU backends both import it
and neither imports the other's internals.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite start of the running max: a row that has seen only masked keys keeps it,
# so exp2(-inf - m) = 0 and exp2(m_old - m_new) = 1, never NaN.
RUNNING_MAX_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def join_reasons(*reasons: str | None) -> str | None:
    """Every reason that is not None, joined with "; "; None when there is none."""
    return "; ".join(r for r in reasons if r) or None


def dot_precision(dtype):
    """float32 inputs: full IEEE products (Triton would otherwise use tf32); others: the default."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def tile_start(block_id, step, block: int, tile: int):
    """Row offset of inner step ``step`` when each selected block is walked in ``block // tile`` tiles.

    ``block_id(j)`` reads the j-th selected block id.
    """
    steps = block // tile
    if steps == 1:
        return block_id(step) * block
    # lax.div / lax.rem on non-negative ints (jnp's floor semantics add selects Triton cannot type).
    return block_id(jax.lax.div(step, steps)) * block + jax.lax.rem(step, steps) * tile


def key_limit(q_pos, span: int):
    """First key position a query at ``q_pos`` may not see under a causal mask of span ``span`` (1: token
    causal; G: block causal), traced into kernels: ``(q_pos // span + 1) * span``."""
    if span == 1:
        return q_pos + 1
    return (jax.lax.div(q_pos, span) + 1) * span  # lax.div: non-negative ints, no floor-division selects


def hide_past_limit(s, first_row, first_key, span: int):
    """Logits tile ``s`` [rows, keys] with ``-inf`` where the causal mask hides the key at ``first_key + j``
    from the query at ``first_row + i``. A select, not an added bias, so a NaN logit of a hidden key
    cannot survive it. Only tiles on the mask's edge pay for it."""
    q_pos = first_row + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = first_key + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(k_pos < key_limit(q_pos, span), s, -jnp.inf)


def sanitize_masked_keys(kv_valid, *arrays):
    """``(*arrays with masked key rows zeroed, key bias)`` for [B, Hkv, Lk, D] arrays and kv_valid [B, Hkv, Lk].

    The rows are zeroed with ``where``, so NaN/Inf stored there cannot leak; the
    float32 bias is 0 for a valid key and -inf for a masked one, added to the
    logits. Done once per call in XLA (one pass over K/V), so that the kernels
    feed K/V tiles straight from shared memory to the tensor cores: a select on
    a tile inside the loop would force a round trip through registers.
    """
    keep = kv_valid[..., None]
    zeroed = tuple(jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in arrays)
    return (*zeroed, jnp.where(kv_valid, 0.0, -jnp.inf).astype(jnp.float32))


def pack_selection(indices, counts):
    """[B, H, N, kmax] + [B, H, N] -> [B, H, N, 1 + kmax] int32: the count, then the ids."""
    return jnp.concatenate([counts[..., None].astype(jnp.int32), indices.astype(jnp.int32)], axis=-1)


def transpose_selection(indices: jax.Array, counts: jax.Array, num_k_blocks: int) -> tuple[jax.Array, jax.Array]:
    """For every key block, the query blocks that selected it (on device, jit-able).

    Args:
      indices: int32 [B, H, Nq, kmax]; counts: int32 [B, H, Nq].
      num_k_blocks: Nk (static).

    Returns:
      indices_t int32 [B, H, Nk, Nq] (query block ids, ascending; entries at
      positions >= counts_t are 0 and never read), counts_t int32 [B, H, Nk].

    Sort-based: live entries become keys ``kid * Nq + qid`` (dead ones a
    sentinel past every real key); one sort per (batch, head) groups them by key
    block with query ids ascending; the rank of an entry inside its group is
    its sorted position minus the group's start (an exclusive cumsum of the
    per-key-block counts, themselves a scatter-add).
    """
    batch, heads, nq, kmax = indices.shape
    nk = num_k_blocks
    live = jnp.arange(kmax, dtype=jnp.int32) < counts[..., None]
    qid = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (nq, kmax))
    keys = jnp.where(live, indices.astype(jnp.int32) * nq + qid, nk * nq).reshape(batch, heads, nq * kmax)
    keys = jnp.sort(keys, axis=-1)
    kid = keys // nq
    bi = jnp.arange(batch, dtype=jnp.int32)[:, None, None]
    hi = jnp.arange(heads, dtype=jnp.int32)[None, :, None]
    counts_t = jnp.zeros((batch, heads, nk + 1), jnp.int32).at[bi, hi, kid].add(1)[..., :nk]
    starts = jnp.cumsum(counts_t, axis=-1) - counts_t
    starts = jnp.concatenate([starts, jnp.zeros((batch, heads, 1), jnp.int32)], axis=-1)
    rank = jnp.arange(nq * kmax, dtype=jnp.int32) - jnp.take_along_axis(starts, kid, axis=-1)
    indices_t = jnp.zeros((batch, heads, nk, nq), jnp.int32).at[bi, hi, kid, rank].set(keys % nq, mode="drop")
    return indices_t, counts_t


def backward_row_terms(out, lse, do, dlse, *, heads_last: bool = False):
    """``(do, delta, lse2)``: the per-row inputs of the FA2-style backward (docs/spec.md section 6).

    do is cast to out's dtype (the inputs' dtype). delta [B, H, L] float32 is
    ``rowsum(dO * O)`` minus the cotangent on lse: d lse_i / d s_ij = p_ij, so
    ``ds = p * (dp - (delta - dlse))``. lse2 [B, H, L] is lse in base 2, +inf for
    rows without a valid key (every p of theirs is then 0). ``heads_last``: out
    and do are [B, L, H, D] (lse and dlse are [B, H, L] either way).
    """
    do = do.astype(out.dtype)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if heads_last:
        delta = jnp.swapaxes(delta, 1, 2)  # [B, L, H] -> [B, H, L], like lse
    if dlse is not None:
        delta = delta - jnp.where(jnp.isneginf(lse), 0.0, dlse.astype(jnp.float32))
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)
    return do, delta, lse2
