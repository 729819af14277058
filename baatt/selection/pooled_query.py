"""Pooled-query estimator: the mean query of each query block against every key, one exact softmax.

The oracle map ``M_hat[a, b]`` (docs/spec.md section 1) averages, over the queries of block ``a``,
the softmax mass each puts on the keys of block ``b``. Mean pooling estimates it from block-mean
queries *and* block-mean keys; the key side is where that loses most on real attention (a few
keys that many queries need, the sink, a needle key). This estimator pools the query side only:

    p[a, j] = softmax_j(Qbar[a] . k_j / sqrt(d))      over the valid keys j that block a may see
    P[a, b] = sum_{j in b} p[a, j]

with ``Qbar[a]`` the mean of the block's real queries. ``Qbar[a] . k_j`` is the mean of the
block's logits for key ``j``, so ``p[a, .]`` is the softmax of the average logit: every key is
seen, at token level, with the weight the block's queries give it on average. Rows sum to 1;
the scores are ``log P``.

Cost, as a fraction of dense attention's ``4 * Lq * Lk * d`` FLOPs: one query row per query block
against every key, ``2 * Nq * Lk * d``, i.e. ``1 / (2 * block_q)`` (0.78% at block_q = 64, 0.39%
at 128); pooling Q adds ``Lq * d``. Memory: a few query blocks at a time (``lax.map``), ``Lk``
logits per query head and block.

Under a causal or block-causal ``BAConfig.mask`` the softmax runs over the keys visible to the
block's last real query, the union of what its queries see (the block's first query sees a
prefix of it). Every off-diagonal block the mask allows is seen whole by all of the block's
queries, and the diagonal block of a causal mask is always kept, so the ranking of the other
blocks does not depend on this choice; no key past the block's last query enters a score.

Blocks are positional (``sort_q`` / ``sort_k`` do not apply). GQA: query head ``h`` uses kv
head ``h // (Hq // Hkv)``. No parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import finish, positional_space
from baatt.selection.query_token import key_limits, map_query_blocks, masked_keys, query_blocks, visible_keys
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector

HIGHEST = jax.lax.Precision.HIGHEST


def log_mass(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``log P`` [B, Hq, Nq, Nk] float32, rows summing to 1 in linear space (``-inf`` for key blocks
    without a visible valid key, and for every block of a batch row whose keys are all masked)."""
    space = positional_space(q, k, config, key_mask)
    k_valid = masked_keys(space)
    b, _, lk, d = k_valid.shape
    nk, bq = space.num_k_blocks, config.block_q
    scale = 1.0 / math.sqrt(d)
    key_ok = space.kv_valid[:, :, None, :]  # [B, Hkv, 1, Lk]

    def one_block(args):
        a, qa, qva = args  # block id, [B, Hkv, G, bq, D], [B, bq]
        n_real = jnp.sum(qva, axis=-1)  # [B]
        q_mean = jnp.sum(jnp.where(qva[:, None, None, :, None], qa, 0.0), axis=3) / jnp.maximum(
            n_real, 1).astype(jnp.float32)[:, None, None, None]  # [B, Hkv, G, D]
        s = jnp.einsum("bhgd,bhkd->bhgk", q_mean, k_valid, precision=HIGHEST) * scale
        limit = key_limits(space, a * bq + jnp.maximum(n_real - 1, 0))  # [B] or None
        seen = visible_keys(key_ok, None if limit is None else limit[:, None, None])
        s = jnp.where(seen, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        log_p = jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)
        return jax.nn.logsumexp(log_p.reshape(log_p.shape[:-1] + (nk, -1)), axis=-1)  # [B, Hkv, G, Nk]

    return map_query_blocks(one_block, query_blocks(space), elements_per_block=b * q.shape[2] * lk)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    scores = log_mass(q, k, config, key_mask=key_mask)
    return finish(scores, q, k, config, probs=jnp.exp(scores))


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The estimate ``P`` of the oracle map."""
    return jnp.exp(log_mass(q, k, config, key_mask=key_mask))


register_selector("pooled_query", select=select, block_map=block_map)
