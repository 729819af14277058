"""Quest-style selection: a per-channel min/max bound of q . k over each key block.

Follows Quest (Tang et al., arXiv 2406.10774), which ranks the pages of a KV cache for one
decoding query by an upper bound of the query's logits over each page. For key block ``b``
keep the per-channel extremes of its valid keys, ``Kmax[b, t]`` and ``Kmin[b, t]``; then for
every query token ``i``

    u[i, b] = sum_t max(q_it * Kmax[b, t], q_it * Kmin[b, t]) / sqrt(d)
            = (max(q_i, 0) . Kmax[b] + min(q_i, 0) . Kmin[b]) / sqrt(d)  >=  max_{j in b} l_ij

so a block holding one key that matches the query scores high however many keys around it
do not. The per-token scores are ``u[i, b] + log n_b`` (``n_b`` valid keys in b, with
``BAConfig.count_correction``), which bounds ``log sum_{j in b} exp(l_ij)`` from above, and
they are aggregated over the real queries of each query block exactly as the ``query_token``
selector does (``aggregate``: mean or max of the tokens' block masses, or log-sum-exp of
their scores; see ``baatt.selection.query_token``).

Where we deviate: Quest scores one decoding query and keeps its top pages; here every query
token of a prefill (or of a denoising step) is scored and its query block takes one selection
through the shared budget step (``common.finish``: sparsity, ``tau``, the peak rule, forced
blocks). Quest adds no count term (its pages are full); blocks here may be ragged or padded.
Under a causal or block-causal ``BAConfig.mask`` a token's bound covers only the keys it may
see: blocks wholly past its limit get ``-inf``, and the block the limit cuts uses the running
extremes and count of the token's visible keys in it. Blocks are positional (``BAConfig``
refuses sorting, clustering and compensation for it). GQA: query head ``h`` uses kv head
``h // (Hq // Hkv)``.

Cost, as a fraction of dense attention's ``4 * Lq * Lk * d`` FLOPs: two products per query
token and key block, ``4 * Lq * Nk * d``, i.e. ``1 / block_k`` (0.78% at block_k = 128,
1.56% at 64); the block extremes take ``2 * Lk * d`` comparisons. Memory: per-token scores
for a few query blocks at a time.

Parameters: ``QuestParams`` (``BAConfig(selector="quest", selector_params=QuestParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.common import finish, positional_space
from baatt.selection.query_token import (
    AGGREGATES,
    aggregate_token_logits,
    cut_at_limit,
    key_limits,
    log_count,
    map_query_blocks,
    masked_keys,
    query_blocks,
    within_blocks,
)
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuestParams:
    """aggregate: how a query block combines its tokens' bounds (one of ``query_token.AGGREGATES``)."""

    aggregate: str = "mean"

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise SelectorParamError(self, "aggregate", f"must be one of {AGGREGATES}")


def key_extremes(space: layout.BlockSpace, *, running: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel max and min of each key block's valid keys, [B, Hkv, Nk, D] float32 (0 for a block
    without a valid key), and the valid-key counts [B, Hkv, Nk].

    running: instead, for every key slot [B, Hkv, Lk_pad, ...], the extremes and count of the valid
    keys of its block up to and including it.
    """
    k = masked_keys(space)
    valid = space.kv_valid[..., None]
    hi, lo = jnp.where(valid, k, -jnp.inf), jnp.where(valid, k, jnp.inf)
    count = space.kv_valid.astype(jnp.float32)
    if running:
        hi, lo = within_blocks(hi, space.block_k, jax.lax.cummax), within_blocks(lo, space.block_k, jax.lax.cummin)
        count = within_blocks(count, space.block_k, jax.lax.cumsum)
    else:
        hi = jnp.max(layout.block_view(hi, space.block_k), axis=-2)
        lo = jnp.min(layout.block_view(lo, space.block_k), axis=-2)
        count = jnp.sum(layout.block_view(count, space.block_k), axis=-1)
    empty = (count == 0)[..., None]
    return jnp.where(empty, 0.0, hi), jnp.where(empty, 0.0, lo), count


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Block scores [B, Hq, Nq, Nk] float32 (``-inf`` for key blocks without a valid key and for those
    ``config.mask`` hides)."""
    aggregate = config.params_for("quest").aggregate
    space = positional_space(q, k, config, key_mask)
    k_max, k_min, count = key_extremes(space)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def bound(qa, hi, lo, spec):
        return (jnp.einsum(spec, jnp.maximum(qa, 0.0), hi, precision=HIGHEST)
                + jnp.einsum(spec, jnp.minimum(qa, 0.0), lo, precision=HIGHEST)) * scale

    bias = log_count(count, config.count_correction)  # [B, Hkv, Nk]
    if not space.mask.is_bidirectional:
        run_max, run_min, run_count = key_extremes(space, running=True)

    def one_block(args):
        a, qa, qva = args  # block id, [B, Hkv, G, bq, D], [B, bq]
        u = bound(qa, k_max, k_min, "bhgqd,bhnd->bhgqn") + bias[:, :, None, None, :]
        limit = key_limits(space, a * config.block_q + jnp.arange(config.block_q))
        if limit is not None:
            at_edge = lambda x: jnp.take(x, limit - 1, axis=2)  # [B, Hkv, bq, ...]
            u_edge = bound(qa, at_edge(run_max), at_edge(run_min), "bhgqd,bhqd->bhgq")
            u_edge = u_edge + log_count(at_edge(run_count), config.count_correction)[:, :, None, :]
            u = cut_at_limit(u, u_edge, limit, config.block_k)
        return aggregate_token_logits(u, qva, aggregate)

    per_block = q.shape[0] * q.shape[2] * config.block_q * space.num_k_blocks
    return map_query_blocks(one_block, query_blocks(space), elements_per_block=per_block)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return finish(block_scores(q, k, config, key_mask=key_mask), q, k, config)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``softmax`` of the block scores."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


register_selector("quest", select=select, block_map=block_map, params=QuestParams)
