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
at 128); pooling Q adds ``Lq * d``. On a CUDA GPU the per-block log-sum-exp runs in a Pallas
kernel (``baatt.kernels.pallas_triton.row_block_lse``) that keeps the logits in registers;
elsewhere XLA computes them a few query blocks at a time (``lax.map``), ``Lk`` logits per query
head and block.

Under a causal or block-causal ``BAConfig.mask`` the softmax runs over the keys visible to the
block's last real query, the union of what its queries see (the block's first query sees a
prefix of it). Every off-diagonal block the mask allows is seen whole by all of the block's
queries, and the diagonal block of a causal mask is always kept, so the ranking of the other
blocks does not depend on this choice; no key past the block's last query enters a score.

Blocks are positional, or ordered by ``sort_q`` / ``sort_k`` (norms) or ``cluster_q`` / ``cluster_k``
(balanced k-means on directions): ``Qbar[a]`` is then the mean of query block ``a`` of that order and
``P[a, b]`` sums over key block ``b`` of that order; the selection carries the permutations. GQA: query
head ``h`` uses kv head ``h // (Hq // Hkv)``. No parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from baatt import layout, platform
from baatt.config import BAConfig
from baatt.kernels.pallas_triton import row_block_lse
from baatt.selection.common import finish
from baatt.selection.estimator import ordered_space
from baatt.selection.query_token import HIGHEST, key_limits, map_query_blocks, masked_keys
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


def pooled_rows(space: layout.BlockSpace) -> tuple[jax.Array, jax.Array]:
    """The mean of each query block's real queries, float32 [B, Hq, Nq, D], and the first key position
    each may not see, int32 [B, Nq]: the limit of the block's last real query (every key when the mask
    is bidirectional)."""
    b, hq, _, d = space.q.shape
    nq, bq = space.num_q_blocks, space.block_q
    real = space.q_valid.reshape(b, 1, nq, bq, 1)
    qb = space.q.astype(jnp.float32).reshape(b, hq, nq, bq, d)
    n_real = jnp.sum(space.q_valid.reshape(b, nq, bq), axis=-1)  # [B, Nq]
    q_mean = jnp.sum(jnp.where(real, qb, 0.0), axis=3) / jnp.maximum(n_real, 1).astype(jnp.float32)[:, None, :, None]
    last = jnp.arange(nq) * bq + jnp.maximum(n_real - 1, 0)
    limit = key_limits(space, last)
    return q_mean, jnp.full((b, nq), space.k.shape[2], jnp.int32) if limit is None else limit.astype(jnp.int32)


def block_logsumexp_xla(rows, space: layout.BlockSpace, limits) -> jax.Array:
    """``log sum_{j in b} exp(rows . k_j / sqrt(d))`` over the valid keys below each row's limit, [B, Hq, R, Nk],
    in XLA: the [R, Lk] logits of a few rows at a time (the kernel's reference)."""
    k_valid = masked_keys(space)
    b, hkv, lk, d = k_valid.shape
    hq, nk = rows.shape[1], space.num_k_blocks
    scale = 1.0 / math.sqrt(d)
    key_ok = space.kv_valid[:, :, None, :]  # [B, Hkv, 1, Lk]

    def one_row(args):
        row, limit = args  # [B, Hkv, G, D], [B]
        s = jnp.einsum("bhgd,bhkd->bhgk", row, k_valid, precision=HIGHEST) * scale
        seen = key_ok & (jnp.arange(lk) < limit[:, None, None, None])
        s = jnp.where(seen, s, -jnp.inf)
        return jax.nn.logsumexp(s.reshape(s.shape[:-1] + (nk, -1)), axis=-1)  # [B, Hkv, G, Nk]

    xs = (jnp.moveaxis(rows.reshape(b, hkv, hq // hkv, -1, d), 3, 0), jnp.moveaxis(limits, 1, 0))
    return map_query_blocks(one_row, xs, elements_per_block=b * hq * lk)


def use_kernel(space: layout.BlockSpace) -> bool:
    """Whether the Pallas kernel runs the block log-sum-exp: on a CUDA GPU, for shapes it supports."""
    return platform.has_gpu() and row_block_lse.unsupported_reason(
        space.q.shape, space.k.shape, space.k.dtype, space.block_k) is None


def log_mass(q, k, config: BAConfig, *, key_mask=None, kernel: bool | None = None,
             interpret: bool = False) -> jax.Array:
    """``log P`` [B, Hq, Nq, Nk] float32, rows summing to 1 in linear space (``-inf`` for key blocks
    without a visible valid key, and for every block of a batch row whose keys are all masked), in the
    block space of ``config`` (positional, sorted or clustered).

    kernel: None picks the Pallas kernel on a GPU where it applies (``use_kernel``), the XLA path
    elsewhere; True / False force one (``interpret=True`` runs the kernel in interpret mode)."""
    return _log_mass(q, k, config, key_mask, kernel, interpret)[0]


def _log_mass(q, k, config: BAConfig, key_mask, kernel, interpret):
    """(``log P``, q_perm, k_perm): ``log_mass`` with the permutations of its block space."""
    space, q_perm, k_perm = ordered_space(q, k, config, key_mask)
    rows, limits = pooled_rows(space)
    if use_kernel(space) if kernel is None else kernel:
        # The rows go to the tensor cores in the keys' dtype (a mean of bf16 queries rounded once to bf16).
        blse = row_block_lse.row_block_logsumexp(rows.astype(space.k.dtype), space.k, space.kv_valid, limits,
                                                 scale=1.0 / math.sqrt(q.shape[-1]), block_k=config.block_k,
                                                 interpret=interpret)
    else:
        blse = block_logsumexp_xla(rows, space, limits)
    lse = jax.nn.logsumexp(blse, axis=-1, keepdims=True)
    # NaN (or Inf) in q or a seen key stays visible.
    return jnp.where(lse == -jnp.inf, -jnp.inf, blse - lse), q_perm, k_perm


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    scores, q_perm, k_perm = _log_mass(q, k, config, key_mask, None, False)
    return finish(scores, q, k, config, q_perm=q_perm, k_perm=k_perm, probs=jnp.exp(scores))


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The estimate ``P`` of the oracle map."""
    return jnp.exp(log_mass(q, k, config, key_mask=key_mask))


register_selector("pooled_query", select=select, block_map=block_map,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k"))
