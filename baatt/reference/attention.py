"""Dense attention and streaming block-sparse attention: the semantics every kernel matches.

Float32 accumulation with ``Precision.HIGHEST``; outputs are cast back to the
input dtype, log-sum-exp stays float32. Under a causal or block-causal mask
(``baatt.attention_mask``) a query attends only to the keys the mask lets it
see; a row that sees no key at all gets output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.attention_mask import AttentionMask, resolve_mask
from baatt.selection.types import BlockSelection
from baatt.validation import check_qkv

HIGHEST = jax.lax.Precision.HIGHEST


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def dense_attention(q, k, v, *, key_mask=None, scale: float | None = None, is_causal: bool = False,
                    mask: AttentionMask | None = None):
    """Exact softmax attention: bidirectional by default, or under a causal / block-causal mask.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with Hkv dividing Hq.
      key_mask: optional bool [B, Lk], True = real key.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned when Lq != Lk, as
        ``jax.nn.dot_product_attention``); shorthand for ``mask=AttentionMask.causal()``.
      mask: a ``baatt.AttentionMask`` (e.g. ``AttentionMask.block_causal(G)``).

    Returns:
      out [B, Lq, Hq, D] in q's dtype, lse [B, Hq, Lq] (float32, float64 for float64 inputs).
    """
    check_qkv(q, k, v, key_mask=key_mask)
    mask = resolve_mask(is_causal, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _dense_jit(q, k, v, key_mask, scale, mask)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dense_jit(q, k, v, key_mask, scale, mask):
    acc = _acc_dtype(q.dtype)
    hm = layout.head_map(q.shape[2], k.shape[2])
    seen = _keys_seen(key_mask, mask, q.shape[1], k.shape[1])  # [B or 1, Lq or 1, Lk] or None
    kh = jnp.take(k, hm, axis=2).astype(acc)
    vh = jnp.take(v, hm, axis=2).astype(acc)
    if seen is not None:
        # Zero the keys no query sees, so that NaN stored there cannot reach a product.
        any_row = jnp.any(seen, axis=1)[:, :, None, None]
        kh, vh = jnp.where(any_row, kh, 0.0), jnp.where(any_row, vh, 0.0)
    s = jnp.einsum("blhd,bmhd->bhlm", q.astype(acc), kh, precision=HIGHEST) * scale
    if seen is not None:
        s = jnp.where(seen[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    has_keys = jnp.isfinite(lse)
    p = jnp.where(has_keys[..., None], jnp.exp(s - jnp.where(has_keys, lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bhlm,bmhd->blhd", p, vh, precision=HIGHEST)
    return out.astype(q.dtype), lse


def _keys_seen(key_mask, mask: AttentionMask, length_q: int, length_k: int):
    """bool [B or 1, Lq or 1, Lk]: query row may see key (key padding and the positional mask), or None."""
    token = mask.token_mask(length_q, length_k)
    if token is None:
        return None if key_mask is None else key_mask[:, None, :]
    token = jnp.asarray(token)[None]
    return token if key_mask is None else token & key_mask[:, None, :]


def block_sparse_blocked(space: layout.BlockSpace, indices: jax.Array, counts: jax.Array, *, scale: float):
    """Flash-style attention over the selected key blocks only, in block space.

    For each query block the loop visits ``indices[..., t]`` for t < counts and
    keeps an online softmax (running max, running sum, accumulator). Unselected
    blocks are never gathered; masked keys and the unused tail of the index list
    are zeroed before any arithmetic, so NaN or Inf there cannot leak in values
    or in gradients. Under a causal ``space.mask`` each query also drops the keys
    of its selected blocks that the mask hides from it.

    Returns out [B, Hq, Nq*block_q, D] (q's dtype) and lse [B, Hq, Nq*block_q].
    """
    q, k, v = space.q, space.k, space.v
    acc = _acc_dtype(q.dtype)
    batch, q_heads, lq, _ = q.shape
    hm = layout.head_map(q_heads, k.shape[1])
    nq, bq, bk = space.num_q_blocks, space.block_q, space.block_k
    # The reference may repeat K/V per query head; kernels must not.
    kb = layout.block_view(jnp.take(k, hm, axis=1), bk)  # [B, Hq, Nk, bk, D]
    vb = layout.block_view(jnp.take(v, hm, axis=1), bk)
    validb = layout.block_view(jnp.take(space.kv_valid, hm, axis=1), bk)  # [B, Hq, Nk, bk]
    qb = layout.block_view(q, bq).astype(acc)  # [B, Hq, Nq, bq, D]
    kmax = indices.shape[-1]
    if not space.mask.is_bidirectional:
        limit = space.mask.key_limit(jnp.arange(nq * bq)).reshape(nq, bq)  # first key each row may not see

    def step(carry, t):
        m, l, o = carry
        idx = indices[..., t]  # [B, Hq, Nq]
        take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
        live = (t < counts)[..., None] & take(validb)  # [B, Hq, Nq, bk]
        kt = jnp.where(live[..., None], take(kb), 0).astype(acc)
        vt = jnp.where(live[..., None], take(vb), 0).astype(acc)
        s = jnp.einsum("bhaqd,bhakd->bhaqk", qb, kt, precision=HIGHEST) * scale
        seen = live[..., None, :]  # [B, Hq, Nq, 1 or bq, bk]
        if not space.mask.is_bidirectional:
            key_pos = idx[..., None] * bk + jnp.arange(bk)  # [B, Hq, Nq, bk]
            seen = seen & (key_pos[..., None, :] < limit[:, :, None])
        s = jnp.where(seen, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(seen, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        o = o * alpha[..., None] + jnp.einsum("bhaqk,bhakd->bhaqd", p, vt, precision=HIGHEST)
        return (m_new, l, o), None

    init = (
        jnp.full((batch, q_heads, nq, bq), -jnp.inf, acc),
        jnp.zeros((batch, q_heads, nq, bq), acc),
        jnp.zeros((batch, q_heads, nq, bq, v.shape[-1]), acc),
    )
    (m, l, o), _ = jax.lax.scan(step, init, jnp.arange(kmax))
    has_keys = l > 0
    out = jnp.where(has_keys[..., None], o / jnp.where(has_keys, l, 1.0)[..., None], 0.0)
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
    return out.reshape(batch, q_heads, lq, -1).astype(q.dtype), lse.reshape(batch, q_heads, lq)


def block_sparse_attention(q, k, v, selection: BlockSelection, *, key_mask=None, scale: float | None = None):
    """Block-sparse attention over ``selection`` (docs/spec.md section 7), in positional layout.

    Permutes Q by ``selection.q_perm`` and K/V by ``selection.k_perm``, streams
    over the selected blocks, and scatters the rows back. With every block
    selected this equals ``dense_attention`` for any permutations. The mask is
    the one the selection was made under (``selection.mask``).

    Returns out [B, Lq, Hq, D], lse [B, Hq, Lq].
    """
    check_qkv(q, k, v, key_mask=key_mask)
    selection.validate(
        batch=q.shape[0], q_heads=q.shape[2], kv_heads=k.shape[2], length_q=q.shape[1], length_k=k.shape[1]
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _block_sparse_jit(q, k, v, selection, key_mask, scale)


@functools.partial(jax.jit, static_argnums=(5,))
def _block_sparse_jit(q, k, v, selection, key_mask, scale):
    space = layout.to_block_space(
        q, k, v, block_q=selection.block_q, block_k=selection.block_k,
        key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm, mask=selection.mask,
    )
    out, lse = block_sparse_blocked(space, selection.indices, selection.counts, scale=scale)
    return layout.from_block_space(out, lse, length_q=q.shape[1], q_perm=selection.q_perm)
