"""Query-token estimator: every query token, unpooled, against block-mean keys.

Mean pooling on the query side averages away the few queries that need a block (docs/spec.md
section 10.2: answer slots inside a 128-query block). Here only the keys are pooled. For
query token ``i`` and key block ``b``:

    s[i, b] = q_i . Kbar[b] / sqrt(d)                                  (Kbar: mean of b's valid keys)
            + log n_b                                                  (with BAConfig.count_correction)
            + variance_weight * (1/d) * sum_t q_it^2 VarK[b, t]        (off by default)

``s[i, b]`` estimates ``log sum_{j in b} exp(l_ij)``: the count term because a block's mass
grows with its size, the variance term because the logits of ``q_i`` over the keys of ``b``
spread by ``(1/d) sum_t q_it^2 VarK[b, t]`` (diagonal covariance), and
``log mean exp(l) ~ mean l + Var(l)/2`` makes ``variance_weight = 1/2`` the log-normal value
(section 5). ``p[i, b] = softmax_b s[i, b]`` is the token's estimated mass on ``b``.

The scores of query block ``a`` aggregate its real queries (``aggregate``):

- ``"mean"``: ``log mean_i p[i, b]``, an estimate of the oracle ``M_hat[a, b]`` (section 1);
- ``"max"``: ``log max_i p[i, b]``, an estimate of the max-oracle
  (``baatt.selection.max_oracle``): a block that one query needs ranks as high as that query
  needs it;
- ``"logsumexp"``: ``log sum_i exp s[i, b]``, the block pair's total unnormalised attention
  weight; queries with larger logits weigh more.

Every aggregate is a log mass up to a per-row constant, so the budget step's
``softmax(scores)`` is the mass that ``tau`` and the peak rule use.

Cost, as a fraction of dense attention's ``4 * Lq * Lk * d`` FLOPs: the products ``q_i . Kbar[b]``
take ``2 * Lq * Nk * d``, i.e. ``1 / (2 * block_k)`` (0.39% at block_k = 128, 0.78% at 64); the
variance term doubles it (``1 / block_k``). Pooling K adds ``Lk * d`` (and as much again for
the variance), negligible. Memory: the per-token scores exist for a few query blocks at a time
(a ``lax.map`` over query blocks), never for all ``Lq x Nk`` at once, so 128K tokens fit.

Sorting (``sort_q`` / ``sort_k``) is BA-Att's and does not apply: blocks are positional. GQA:
query head ``h`` is scored against kv head ``h // (Hq // Hkv)``.

This module also holds the pieces the other token-level selectors (``quest``, ``mixed``,
``proxy``, ``max_oracle``) share: query blocks as the leading axis of a ``lax.map`` and the
aggregation of per-token block logits.

Parameters: ``QueryTokenParams`` (``BAConfig(selector="query_token",
selector_params=QueryTokenParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.common import finish, positional_space
from baatt.selection.estimator import block_stats
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST

AGGREGATES = ("mean", "max", "logsumexp")

# Float32 values of a lax.map step's largest intermediate; bounds the memory of every token-level selector.
_TILE_ELEMENTS = 1 << 25


@dataclasses.dataclass(frozen=True)
class QueryTokenParams:
    """aggregate: how a query block combines its tokens' block scores, one of ``AGGREGATES``;
    variance_weight: weight of the per-block key-variance term (0 = off, 0.5 = log-normal)."""

    aggregate: str = "mean"
    variance_weight: float = 0.0

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise SelectorParamError(self, "aggregate", f"must be one of {AGGREGATES}")
        w = self.variance_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise SelectorParamError(self, "variance_weight", "must be a finite number >= 0")


# -- shared by the token-level selectors ------------------------------------------------------


def query_blocks(space: layout.BlockSpace) -> tuple[jax.Array, jax.Array]:
    """Queries per query block, block axis first: q [Nq, B, Hkv, G, block_q, D] float32 (G query
    heads per kv head) and their validity [Nq, B, block_q] (False for the rows padding the last block)."""
    b, hq, _, d = space.q.shape
    hkv = space.k.shape[1]
    nq, bq = space.num_q_blocks, space.block_q
    qb = space.q.astype(jnp.float32).reshape(b, hkv, hq // hkv, nq, bq, d)
    return jnp.moveaxis(qb, 3, 0), jnp.moveaxis(space.q_valid.reshape(b, nq, bq), 1, 0)


def map_query_blocks(fn: Callable, xs, *, elements_per_block: int) -> jax.Array:
    """``lax.map`` of ``fn`` over the leading (query block) axis of ``xs``, with as many blocks per
    step as keep a step's largest intermediate (``elements_per_block`` per block) near 2^25 values.

    ``fn`` returns [B, Hkv, G, ...] per block; the result is [B, Hq, Nq, ...].
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    batch = max(1, min(n, _TILE_ELEMENTS // max(elements_per_block, 1)))
    out = jax.lax.map(fn, xs, batch_size=batch)  # [Nq, B, Hkv, G, ...]
    nq, b, hkv, g = out.shape[:4]
    return jnp.moveaxis(out.reshape((nq, b, hkv * g) + out.shape[4:]), 0, 2)


def aggregate_token_logits(s: jax.Array, q_valid: jax.Array, aggregate: str) -> jax.Array:
    """Block scores of one query block from its tokens' block logits.

    s: [B, Hkv, G, block_q, Nk] per-token block logits, ``-inf`` for key blocks without a valid
    key; q_valid: bool [B, block_q]. Returns [B, Hkv, G, Nk] as described in the module
    docstring (``-inf`` where no real query gives the block any weight).
    """
    real = q_valid[:, None, None, :, None]
    if aggregate == "logsumexp":
        return jax.nn.logsumexp(jnp.where(real, s, -jnp.inf), axis=-2)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    # A batch row whose keys are all masked has lse -inf: its tokens get no mass anywhere.
    log_p = jnp.where(real & jnp.isfinite(lse), s - lse, -jnp.inf)
    if aggregate == "max":
        return jnp.max(log_p, axis=-2)
    n_real = jnp.maximum(jnp.sum(q_valid, axis=-1), 1).astype(jnp.float32)
    return jax.nn.logsumexp(log_p, axis=-2) - jnp.log(n_real)[:, None, None, None]


def key_validity(space: layout.BlockSpace) -> tuple[jax.Array, jax.Array]:
    """Masked keys zeroed, float32 [B, Hkv, Lk_pad, D], and the valid-key count per key block [B, Hkv, Nk]."""
    k = jnp.where(space.kv_valid[..., None], space.k.astype(jnp.float32), 0.0)
    count = jnp.sum(layout.block_view(space.kv_valid, space.block_k), axis=-1).astype(jnp.float32)
    return k, count


# -- the query-token selector ------------------------------------------------------------------


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Block scores [B, Hq, Nq, Nk] float32 (log masses up to a per-row constant; ``-inf`` for key
    blocks without a valid key)."""
    params = config.params_for("query_token")
    space = positional_space(q, k, config, key_mask)
    w = float(params.variance_weight)
    stats = block_stats(space.k, space.kv_valid, config.block_k, with_var=w > 0)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = jnp.where(stats.count > 0, 0.0, -jnp.inf)  # [B, Hkv, Nk]
    if config.count_correction:
        bias = bias + jnp.log(jnp.maximum(stats.count, 1.0))
    pair = lambda x, y: jnp.einsum("bhgqd,bhnd->bhgqn", x, y, precision=HIGHEST)

    def one_block(args):
        qa, qva = args  # [B, Hkv, G, bq, D], [B, bq]
        s = pair(qa, stats.mean) * scale + bias[:, :, None, None, :]
        if w > 0:
            s = s + (w / q.shape[-1]) * pair(qa * qa, stats.var)
        return aggregate_token_logits(s, qva, params.aggregate)

    qb, qvb = query_blocks(space)
    per_block = q.shape[0] * q.shape[2] * config.block_q * space.num_k_blocks
    return map_query_blocks(one_block, (qb, qvb), elements_per_block=per_block)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return finish(block_scores(q, k, config, key_mask=key_mask), q, k, config)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``softmax`` of the block scores: for ``aggregate="mean"`` the mean of the tokens' block masses."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


register_selector("query_token", select=select, block_map=block_map, params=QueryTokenParams)
