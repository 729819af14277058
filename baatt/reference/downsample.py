"""Block statistics, BA-Att's pre-downsample scores, and the oracle post-downsample map, stated plainly.

docs/spec.md section 1 (oracle ``M_hat``), section 2 (pooled logits), section 4
(norm sorting), section 5 (covariance compensation, count correction). The fast
estimator (``baatt.selection.estimator``) computes the same scores and is tested
against ``pre_downsample_scores``.

Under a causal or block-causal mask (``config.mask``, or the ``mask`` of the block
space) a query's row of logits holds only the keys it may see: the oracle map
spreads each query's mass over those, and a block pair the mask wholly hides has
score ``-inf`` and mass 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.attention_mask import AttentionMask, resolve_mask
from baatt.config import BAConfig
from baatt.reference.sorting import norm_sort
from baatt.validation import check_qk

HIGHEST = jax.lax.Precision.HIGHEST


def block_moments(x: jax.Array, valid: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-block mean and per-channel population variance over the valid tokens, and their count.

    x [B, H, N*block, D], valid bool broadcastable to [B, H, N*block]. Returns mean, var
    [B, H, N, D] and count [B, H, N], float32; an empty block has mean 0, var 0, count 0.
    """
    xb = layout.block_view(x.astype(jnp.float32), block)
    vb = layout.block_view(jnp.broadcast_to(valid, x.shape[:3]), block)[..., None]
    count = jnp.sum(vb, axis=-2, dtype=jnp.float32)  # [B, H, N, 1]
    mean = jnp.sum(jnp.where(vb, xb, 0.0), axis=-2) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.where(vb, (xb - mean[..., None, :]) ** 2, 0.0), axis=-2) / jnp.maximum(count, 1.0)
    return mean, var, count[..., 0]


def pre_downsample_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """BA-Att block logits [B, Hq, Nq, Nk]; with sorting on, in sorted block order.

    score[a, b] = Qbar_a . Kbar_b / sqrt(d)                                  (section 2)
                + beta * (1/d) sum_t VarQ Kbar^2 + VarK Qbar^2 + VarQ VarK   (section 5, with compensate)
                + log(valid keys in b)                                      (with count_correction)
    over the blocks of the norm-sorted tokens when ``sort_q`` / ``sort_k`` (section 4);
    ``-inf`` for key blocks without a valid key. ``softmax`` over the last axis gives the
    pre-downsample map ``M`` (section 2).

    Under ``config.mask``: ``-inf`` for the block pairs the mask hides; on a pair the
    mask cuts (the diagonal of a causal mask: some real query may not see some valid
    key) the pooled logit becomes the mean logit over the (query, key) pairs the mask
    allows, the count term counts the keys a query of the block sees on average, and
    there is no compensation term: no statistic of a key a query may not see enters
    its score.
    """
    check_qk(q, k, key_mask=key_mask)
    return _pre_scores_jit(q, k, key_mask, config)


@functools.partial(jax.jit, static_argnums=(3,))
def _pre_scores_jit(q, k, key_mask, config):
    q_perm = norm_sort(q)[0] if config.sort_q else None
    k_perm = norm_sort(k, mask=key_mask)[0] if config.sort_k else None
    space = layout.to_block_space(q, k, None, block_q=config.block_q, block_k=config.block_k,
                                  key_mask=key_mask, q_perm=q_perm, k_perm=k_perm, mask=config.mask)
    q_mean, q_var, _ = block_moments(space.q, space.q_valid[:, None, :], config.block_q)
    k_mean, k_var, k_count = (jnp.take(a, layout.head_map(q.shape[2], k.shape[2]), axis=1)
                              for a in block_moments(space.k, space.kv_valid, config.block_k))
    pair = lambda a, b: jnp.einsum("bhad,bhnd->bhan", a, b, precision=HIGHEST)
    d = q.shape[-1]
    scores = pair(q_mean, k_mean) / math.sqrt(d)
    if config.compensate:
        delta = (pair(q_var, k_mean**2) + pair(q_mean**2, k_var) + pair(q_var, k_var)) / d
        scores = scores + config.beta * delta
    if config.count_correction:
        scores = scores + jnp.log(jnp.maximum(k_count, 1.0))[:, :, None, :]
    scores = jnp.where(k_count[:, :, None, :] > 0, scores, -jnp.inf)
    if config.mask.is_bidirectional:
        return scores
    allowed, _ = config.mask.block_pairs(q.shape[1], k.shape[1], config.block_q, config.block_k)
    mean_logit, seen = masked_block_logits(space, 1.0 / math.sqrt(d))
    cut = mean_logit + (jnp.log(jnp.maximum(seen, 1e-30)) if config.count_correction else 0.0)
    # Where every real query sees every valid key of the block, the pair is not cut.
    whole = seen >= k_count[:, :, None, :]
    return jnp.where(allowed & whole, scores, jnp.where(allowed & (seen > 0), cut, -jnp.inf))


def masked_block_logits(space: layout.BlockSpace, scale: float) -> tuple[jax.Array, jax.Array]:
    """Per block pair, over the (real query, key) pairs ``space.mask`` allows: the mean logit and the
    number of keys a real query of the block sees on average. Both [B, Hq, Nq, Nk]; 0 where no pair is allowed.

    Streamed over key blocks (the reference: every pair, not only those on the mask's edge).
    """
    logits = _stream_logits(space, scale)
    b, hq, nq, bq = space.q.shape[0], space.q.shape[1], space.num_q_blocks, space.block_q
    qv = space.q_valid.reshape(b, 1, nq, bq, 1)
    real_rows = jnp.maximum(jnp.sum(qv, axis=(-1, -2)), 1.0)  # [B, 1, Nq]

    def per_key_block(j):
        s = logits(j).reshape(b, hq, nq, bq, -1)
        seen = jnp.isfinite(s) & qv
        total = jnp.sum(jnp.where(seen, s, 0.0), axis=(-1, -2))
        pairs = jnp.sum(seen, axis=(-1, -2)).astype(jnp.float32)
        return total / jnp.maximum(pairs, 1.0), pairs / real_rows

    mean, seen = jax.lax.map(per_key_block, jnp.arange(space.num_k_blocks))
    return jnp.moveaxis(mean, 0, -1), jnp.moveaxis(seen, 0, -1)


def _stream_logits(space: layout.BlockSpace, scale: float):
    """Yields a function of a key-block index giving masked logits [B, Hq, Lq_pad, block_k] (float32).

    ``-inf`` at invalid keys and at the keys ``space.mask`` hides from a row.
    """
    hq, hkv = space.q.shape[1], space.k.shape[1]
    group = hq // hkv
    b, _, lq, d = space.q.shape
    bk = space.block_k
    qg = space.q.astype(jnp.float32).reshape(b, hkv, group, lq, d)
    kb = layout.block_view(space.k.astype(jnp.float32), bk)  # [B, Hkv, Nk, bk, D]
    validb = layout.block_view(space.kv_valid, bk)
    limit = None if space.mask.is_bidirectional else space.mask.key_limit(jnp.arange(lq))

    def logits(j):
        kj = jnp.where(validb[:, :, j, :, None], kb[:, :, j], 0.0)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kj, precision=HIGHEST) * scale
        seen = validb[:, :, j][:, :, None, None, :]
        if limit is not None:
            seen = seen & (j * bk + jnp.arange(bk) < limit[:, None])
        s = jnp.where(seen, s, -jnp.inf)
        return s.reshape(b, hq, lq, -1)

    return logits


def row_logsumexp(space: layout.BlockSpace, scale: float) -> jax.Array:
    """log-sum-exp of every query row over all valid keys, streamed over key blocks: [B, Hq, Lq_pad]."""
    logits = _stream_logits(space, scale)

    def step(carry, j):
        m, l = carry
        s = logits(j)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        l = l * jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe) + jnp.sum(jnp.exp(s - m_safe[..., None]), -1)
        return (m_new, l), None

    shape = space.q.shape[:3]
    (m, l), _ = jax.lax.scan(step, (jnp.full(shape, -jnp.inf), jnp.zeros(shape)), jnp.arange(space.num_k_blocks))
    return m + jnp.log(l)


def post_downsample_blocked(space: layout.BlockSpace, *, scale: float) -> jax.Array:
    """Oracle map in block space, [B, Hq, Nq, Nk], without materialising L x L.

    Pass 1 streams over key blocks for each row's log-sum-exp; pass 2 streams
    again and accumulates each row's probability mass per key block, then
    averages rows within each query block over the real (unpadded) queries.
    """
    lse = row_logsumexp(space, scale)
    logits = _stream_logits(space, scale)
    b = space.q_valid.shape[0]
    qv = space.q_valid.reshape(b, -1, space.block_q).astype(jnp.float32)  # [B, Nq, bq]
    nq_real = jnp.maximum(jnp.sum(qv, axis=-1), 1.0)  # [B, Nq]

    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # a row that sees no key puts no mass anywhere

    def mass(j):
        p = jnp.sum(jnp.exp(logits(j) - lse[..., None]), axis=-1)  # [B, Hq, Lq_pad]
        pb = layout.block_view(p, space.block_q)  # [B, Hq, Nq, bq]
        return jnp.sum(pb * qv[:, None], axis=-1) / nq_real[:, None]

    per_block = jax.lax.map(mass, jnp.arange(space.num_k_blocks))  # [Nk, B, Hq, Nq]
    return jnp.moveaxis(per_block, 0, -1)


def post_downsample_map(
    q, k, *, block_size: int, key_mask=None, block_size_k: int | None = None,
    q_perm=None, k_perm=None, scale: float | None = None, is_causal: bool = False,
    mask: AttentionMask | None = None,
) -> jax.Array:
    """The oracle ``M_hat`` [B, Hq, Nq, Nk] (docs/spec.md section 1).

    ``M_hat[a, b]`` is the attention mass that the queries of block ``a`` put on
    the keys of block ``b``, averaged over the queries: each row sums to 1.
    Blocks are positional unless ``q_perm`` / ``k_perm`` (as returned by
    ``norm_sort``) place it in a sorted block space. Memory is linear in L.
    ``is_causal`` / ``mask``: the attention mask (as ``dense_attention``); each
    query's softmax runs over the keys it may see.
    """
    check_qk(q, k, key_mask=key_mask)
    mask = resolve_mask(is_causal, mask)
    for name, value in (("block_size", block_size), ("block_size_k", block_size_k)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    block_k = block_size if block_size_k is None else block_size_k
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _post_map_jit(q, k, key_mask, q_perm, k_perm, block_size, block_k, scale, mask)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _post_map_jit(q, k, key_mask, q_perm, k_perm, block_q, block_k, scale, mask):
    space = layout.to_block_space(
        q, k, None, block_q=block_q, block_k=block_k, key_mask=key_mask, q_perm=q_perm, k_perm=k_perm, mask=mask
    )
    return post_downsample_blocked(space, scale=scale)
