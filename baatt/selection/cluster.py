"""Content-clustered block spaces: tokens ordered into blocks by balanced k-means on their directions.

Norm sorting (docs/spec.md section 4) narrows the spread inside a block by grouping tokens of
similar norm; clustering groups tokens of similar direction, which is what the pooled logit
``Qbar . Kbar`` loses when a block mixes directions. The result is a permutation per (batch,
head), like ``norm_sort``'s, so the same permuted-space pipeline runs it
(``BlockSelection.q_perm`` / ``k_perm``; ``BAConfig(cluster_q=True, cluster_k=True)``).

Blocks must stay whole, so the clusters have equal size (one block each; the last one holds
the remainder of a ragged length). Each Lloyd iteration:

1. similarities ``S = x_hat . c`` of the unit-norm tokens to the unit-norm centroids;
2. a balanced soft assignment: a few Sinkhorn steps in log space on ``S / temperature`` with
   every token's row summing to 1 and every cluster's column to its capacity;
3. a hard, exactly balanced assignment: tokens ordered by (their best cluster under that plan,
   then how strongly they prefer it), cut into consecutive runs of ``block`` tokens; the few
   that overflow a full cluster spill into the next one in that order;
4. centroids = the mean direction of each run.

Centroids start as the positional blocks' mean directions, so one iteration already improves
on positional blocks, and the whole is deterministic. Padding and masked keys (``mask``) come
last, as in ``norm_sort``, so they never split a block of real tokens.

Cost per iteration: ``2 * L * (L / block) * d`` for the similarities plus ``L log L`` for the
sort, i.e. ``1 / (2 * block)`` of dense attention's ``4 L^2 d`` per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

# Sinkhorn steps per Lloyd iteration and the temperature of the soft assignment (cosine units).
_SINKHORN_STEPS = 8
_TEMPERATURE = 0.05


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _balanced_order(sim: jax.Array, valid: jax.Array, block: int) -> jax.Array:
    """Token order [B, H, L] whose consecutive runs of ``block`` are the balanced clusters.

    sim [B, H, L, C]: token-to-centroid similarities; valid bool [B, L] (or broadcastable).
    """
    length, clusters = sim.shape[-2], sim.shape[-1]
    capacity = jnp.minimum(block, length - jnp.arange(clusters) * block).astype(jnp.float32)  # [C]
    log_plan = jnp.where(valid[..., None], sim / _TEMPERATURE, -jnp.inf)
    log_capacity = jnp.log(capacity)

    def sinkhorn_step(_, log_plan):  # rows: each token once; columns: each cluster its capacity
        log_plan = log_plan - jax.nn.logsumexp(log_plan, axis=-1, keepdims=True)
        log_plan = jnp.where(valid[..., None], log_plan, -jnp.inf)
        column = jax.nn.logsumexp(log_plan, axis=-2, keepdims=True)
        return log_plan - jnp.where(jnp.isfinite(column), column, 0.0) + log_capacity

    log_plan = jax.lax.fori_loop(0, _SINKHORN_STEPS, sinkhorn_step, log_plan)
    best = jnp.argmax(log_plan, axis=-1)  # [B, H, L]
    strength = jnp.max(log_plan, axis=-1)
    # One sort on (cluster, -strength): within a cluster its most confident tokens first, so the
    # overflow of a full cluster is its least confident tokens. Invalid tokens go last.
    rank = jnp.argsort(-jnp.where(valid, strength, -jnp.inf), axis=-1, stable=True)
    cluster_of_ranked = jnp.take_along_axis(jnp.where(valid, best, clusters), rank, axis=-1)
    order = jnp.argsort(cluster_of_ranked, axis=-1, stable=True)
    return jnp.take_along_axis(rank, order, axis=-1).astype(jnp.int32)


def balanced_kmeans(x: jax.Array, block: int, *, iters: int, mask: jax.Array | None = None) -> jax.Array:
    """Permutation int32 [B, H, L] grouping the tokens of x [B, L, H, D] into equal-size clusters of direction.

    ``x_clustered[b, h] = x[b, perm[b, h], h]``; block ``j`` of that order is cluster ``j``
    (``block`` tokens each, the last one the remainder). mask: bool [B, L], True = real token;
    the others come last. iters: Lloyd iterations (>= 1).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1; got {iters}")
    b, length, h, d = x.shape
    clusters = -(-length // block)
    unit = _unit(jnp.swapaxes(x.astype(jnp.float32), 1, 2))  # [B, H, L, D]
    valid = jnp.ones((b, 1, length), jnp.bool_) if mask is None else mask[:, None, :]
    weight = valid[..., None].astype(jnp.float32)
    pad = clusters * block - length

    def centroids(order):  # mean unit direction of each run of ``block`` tokens in ``order``
        members = jnp.take_along_axis(unit * weight, order[..., None], axis=2)
        members = jnp.pad(members, ((0, 0), (0, 0), (0, pad), (0, 0)))
        return _unit(jnp.sum(members.reshape(b, h, clusters, block, d), axis=3))

    order = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, h, length))
    if mask is not None:  # start from positional blocks of the real tokens
        order = jnp.argsort(~valid, axis=-1, stable=True).astype(jnp.int32) + jnp.zeros((b, h, 1), jnp.int32)

    def lloyd_step(_, order):
        sim = jnp.einsum("bhld,bhcd->bhlc", unit, centroids(order), precision=HIGHEST)
        return _balanced_order(sim, valid, block)

    return jax.lax.fori_loop(0, iters, lloyd_step, order)

