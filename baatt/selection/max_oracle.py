"""Max-oracle: key blocks ranked by the largest mass any one query of the query block puts on them.

The oracle (``baatt.selection.oracle``, docs/spec.md section 1) averages the exact attention
over the queries of a block, ``M_hat[a, b] = mean_{i in I(a)} sum_{j in J(b)} A_ij``, so a key
block that a few queries need badly can rank below one that every query likes a little (the
passkey case of section 10.2: a few answer slots in a 128-query block). The max-oracle keeps
the most demanding query instead:

    M_max[a, b] = max_{i in I(a)} sum_{j in J(b)} A_ij

over the real queries of block ``a``. Its rows do not sum to 1; the block scores are
``log M_max`` and the mass of the ``tau`` and peak rules is ``M_max`` with each row
normalised. Like the oracle it costs a dense attention pass and is a yardstick, not a
selector to deploy; it is computed exactly (each query row's softmax over all keys) for a
few query blocks at a time, in log space (a block whose mass underflows float32 keeps a
finite, correctly ranked score), never forming ``L x L``. With ``sort_q`` / ``sort_k`` it
works in the norm-sorted block space, as the oracle does; under a causal or block-causal
``BAConfig.mask`` each query's softmax runs over the keys it may see.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.common import finish
from baatt.selection.estimator import ordered_space
from baatt.selection.query_token import key_limits, map_query_blocks, masked_keys, query_blocks, visible_keys
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector

HIGHEST = jax.lax.Precision.HIGHEST


def log_max_mass(space: layout.BlockSpace, scale: float) -> jax.Array:
    """``log M_max`` [B, Hq, Nq, Nk] float32 of a block space (``-inf`` for key blocks without a valid key)."""
    k = masked_keys(space)
    key_ok = space.kv_valid[:, :, None, None, :]  # [B, Hkv, 1, 1, Lk_pad]
    nk, bk = space.num_k_blocks, space.block_k

    def one_block(args):
        a, qa, qva = args  # block id, [B, Hkv, G, bq, D], [B, bq]
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qa, k, precision=HIGHEST) * scale
        limit = key_limits(space, a * space.block_q + jnp.arange(space.block_q))
        s = jnp.where(visible_keys(key_ok, limit), s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        log_p = jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)
        log_mass = jax.nn.logsumexp(log_p.reshape(log_p.shape[:-1] + (nk, bk)), axis=-1)  # [B, Hkv, G, bq, Nk]
        return jnp.max(jnp.where(qva[:, None, None, :, None], log_mass, -jnp.inf), axis=-2)

    per_block = space.q.shape[0] * space.q.shape[1] * space.block_q * space.k.shape[2]
    return map_query_blocks(one_block, query_blocks(space), elements_per_block=per_block)


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``log M_max`` [B, Hq, Nq, Nk] in the (sorted) block space of the selection."""
    space, _, _ = ordered_space(q, k, config, key_mask)
    return log_max_mass(space, 1.0 / math.sqrt(q.shape[-1]))


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    space, q_perm, k_perm = ordered_space(q, k, config, key_mask)
    scores = log_max_mass(space, 1.0 / math.sqrt(q.shape[-1]))
    # softmax(log M_max), the budget step's default mass, is M_max with each row normalised.
    return finish(scores, q, k, config, q_perm=q_perm, k_perm=k_perm)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``M_max`` with each row normalised, in the (sorted) block space of the selection."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


# Compensation corrects an estimate; the max-oracle has none, so its selection is the same either way.
register_selector("max_oracle", select=select, block_map=block_map, params=None,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate"))
