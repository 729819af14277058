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

Under a causal or block-causal ``BAConfig.mask`` a token's scores cover only the keys it may
see: key blocks wholly past its limit get ``-inf``, and the one block the limit cuts (the
diagonal of a causal mask) is scored from the mean, count and variance of the token's visible
keys in it (prefix statistics inside each block), so no statistic of a future key enters a
score. The budget step then keeps only the block pairs the mask allows.

Sorting (``sort_q`` / ``sort_k``) is BA-Att's and does not apply: blocks are positional. GQA:
query head ``h`` is scored against kv head ``h // (Hq // Hkv)``.

This module also holds the pieces the other token-level selectors (``quest``, ``mixed``,
``proxy``, ``max_oracle``) share: query blocks as the leading axis of a ``lax.map``, the
mask's limit for each query row, and the aggregation of per-token block logits.

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


def query_blocks(space: layout.BlockSpace) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries per query block, block axis first: the block ids [Nq], q [Nq, B, Hkv, G, block_q, D]
    float32 (G query heads per kv head) and their validity [Nq, B, block_q] (False for the rows
    padding the last block)."""
    b, hq, _, d = space.q.shape
    hkv = space.k.shape[1]
    nq, bq = space.num_q_blocks, space.block_q
    qb = space.q.astype(jnp.float32).reshape(b, hkv, hq // hkv, nq, bq, d)
    return jnp.arange(nq), jnp.moveaxis(qb, 3, 0), jnp.moveaxis(space.q_valid.reshape(b, nq, bq), 1, 0)


def key_limits(space: layout.BlockSpace, positions: jax.Array) -> jax.Array | None:
    """Under a causal or block-causal ``space.mask``: the first key position each query position may
    not see, clipped to the padded key length (int, shape of ``positions``); None when bidirectional."""
    if space.mask.is_bidirectional:
        return None
    return jnp.minimum(space.mask.key_limit(positions), space.k.shape[2])


def visible_keys(key_ok: jax.Array, limit: jax.Array | None) -> jax.Array:
    """``key_ok`` [..., Lk_pad] and'ed with ``key position < limit`` (``limit`` [...] per query row, None: all)."""
    if limit is None:
        return key_ok
    return key_ok & (jnp.arange(key_ok.shape[-1]) < limit[..., None])


def within_blocks(x: jax.Array, block: int, op) -> jax.Array:
    """``op`` (``lax.cumsum`` / ``cummax`` / ``cummin``) along axis 2 of x [B, H, N*block, ...], restarting
    at every block: each key slot gets the running statistic of its block up to and including itself."""
    xb = layout.block_view(x, block)
    return op(xb, axis=3).reshape(x.shape)


def cut_at_limit(s: jax.Array, s_edge: jax.Array, limit: jax.Array, block_k: int) -> jax.Array:
    """Per-token block scores s [..., block_q, Nk] under a causal mask: key blocks wholly before a
    token's ``limit`` [block_q] keep their score, the block the limit cuts (the one holding key
    ``limit - 1``) takes ``s_edge`` [..., block_q], and later blocks get ``-inf``."""
    edge = ((limit - 1) // block_k)[:, None]
    col = jnp.arange(s.shape[-1])
    return jnp.where(col < edge, s, jnp.where(col == edge, s_edge[..., None], -jnp.inf))


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


def masked_keys(space: layout.BlockSpace) -> jax.Array:
    """The keys of a block space in float32 [B, Hkv, Lk_pad, D], zero where not valid (padding may hold anything)."""
    return jnp.where(space.kv_valid[..., None], space.k.astype(jnp.float32), 0.0)


def log_count(count: jax.Array, count_correction: bool) -> jax.Array:
    """Per-block score term of a valid-key count: ``log n`` (0 without the count correction), ``-inf`` for n = 0."""
    empty = jnp.where(count > 0, 0.0, -jnp.inf)
    return empty + jnp.log(jnp.maximum(count, 1.0)) if count_correction else empty


# -- the query-token selector ------------------------------------------------------------------


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Block scores [B, Hq, Nq, Nk] float32 (log masses up to a per-row constant; ``-inf`` for key
    blocks without a valid key and for those ``config.mask`` hides)."""
    params = config.params_for("query_token")
    space = positional_space(q, k, config, key_mask)
    w = float(params.variance_weight)
    d = q.shape[-1]
    stats = block_stats(space.k, space.kv_valid, config.block_k, with_var=w > 0)
    scale = 1.0 / math.sqrt(d)
    pair = lambda x, y: jnp.einsum("bhgqd,bhnd->bhgqn", x, y, precision=HIGHEST)
    edge_pair = lambda x, y: jnp.einsum("bhgqd,bhqd->bhgq", x, y, precision=HIGHEST)
    bias = log_count(stats.count, config.count_correction)  # [B, Hkv, Nk]
    if not space.mask.is_bidirectional:
        # Running sums inside each key block: the statistics of the keys up to a token's limit.
        k_valid = masked_keys(space)
        ones = space.kv_valid.astype(jnp.float32)
        run_count, run_sum, run_sq = (within_blocks(x, config.block_k, jax.lax.cumsum)
                                      for x in (ones, k_valid, k_valid * k_valid))

    def one_block(args):
        a, qa, qva = args  # block id, [B, Hkv, G, bq, D], [B, bq]
        s = pair(qa, stats.mean) * scale + bias[:, :, None, None, :]
        if w > 0:
            s = s + (w / d) * pair(qa * qa, stats.var)
        limit = key_limits(space, a * config.block_q + jnp.arange(config.block_q))
        if limit is not None:
            at_edge = lambda x: jnp.take(x, limit - 1, axis=2)  # [B, Hkv, bq, ...]
            count = at_edge(run_count)
            mean = at_edge(run_sum) / jnp.maximum(count, 1.0)[..., None]
            s_edge = edge_pair(qa, mean) * scale + log_count(count, config.count_correction)[:, :, None, :]
            if w > 0:
                var = jnp.maximum(at_edge(run_sq) / jnp.maximum(count, 1.0)[..., None] - mean * mean, 0.0)
                s_edge = s_edge + (w / d) * edge_pair(qa * qa, var)
            s = cut_at_limit(s, s_edge, limit, config.block_k)
        return aggregate_token_logits(s, qva, params.aggregate)

    per_block = q.shape[0] * q.shape[2] * config.block_q * space.num_k_blocks
    return map_query_blocks(one_block, query_blocks(space), elements_per_block=per_block)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return finish(block_scores(q, k, config, key_mask=key_mask), q, k, config)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``softmax`` of the block scores: for ``aggregate="mean"`` the mean of the tokens' block masses."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


register_selector("query_token", select=select, block_map=block_map, params=QueryTokenParams)
