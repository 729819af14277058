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
Blocks are positional (``sort_q`` / ``sort_k`` do not apply). GQA: query head ``h`` uses kv
head ``h // (Hq // Hkv)``.

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
from baatt.selection.query_token import AGGREGATES, aggregate_token_logits, key_validity, map_query_blocks, query_blocks
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


def key_extremes(space: layout.BlockSpace) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel max and min of each key block's valid keys, [B, Hkv, Nk, D] float32 (0 for a block
    without a valid key), and the valid-key counts [B, Hkv, Nk]."""
    k, count = key_validity(space)
    kb = layout.block_view(k, space.block_k)  # [B, Hkv, Nk, bk, D]
    valid = layout.block_view(space.kv_valid, space.block_k)[..., None]
    hi = jnp.max(jnp.where(valid, kb, -jnp.inf), axis=-2)
    lo = jnp.min(jnp.where(valid, kb, jnp.inf), axis=-2)
    empty = (count == 0)[..., None]
    return jnp.where(empty, 0.0, hi), jnp.where(empty, 0.0, lo), count


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Block scores [B, Hq, Nq, Nk] float32 (``-inf`` for key blocks without a valid key)."""
    aggregate = config.params_for("quest").aggregate
    space = positional_space(q, k, config, key_mask)
    k_max, k_min, count = key_extremes(space)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = jnp.where(count > 0, 0.0, -jnp.inf)
    if config.count_correction:
        bias = bias + jnp.log(jnp.maximum(count, 1.0))
    pair = lambda x, y: jnp.einsum("bhgqd,bhnd->bhgqn", x, y, precision=HIGHEST)

    def one_block(args):
        qa, qva = args  # [B, Hkv, G, bq, D], [B, bq]
        u = (pair(jnp.maximum(qa, 0.0), k_max) + pair(jnp.minimum(qa, 0.0), k_min)) * scale
        return aggregate_token_logits(u + bias[:, :, None, None, :], qva, aggregate)

    qb, qvb = query_blocks(space)
    per_block = q.shape[0] * q.shape[2] * config.block_q * space.num_k_blocks
    return map_query_blocks(one_block, (qb, qvb), elements_per_block=per_block)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return finish(block_scores(q, k, config, key_mask=key_mask), q, k, config)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``softmax`` of the block scores."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


register_selector("quest", select=select, block_map=block_map, params=QuestParams)
