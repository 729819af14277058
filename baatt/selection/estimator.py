"""The BA-Att estimator: norm sorts, block statistics and pooled scores, fused for speed.

docs/spec.md section 2 (pooled logits), section 4 (norm sorting), section 5
(covariance compensation, count correction). Same quantities as
``baatt.reference.pre_downsample_scores``, which states them plainly and which the
tests compare this against; here the statistics take one read of Q and K
(shifted one-pass moments, reductions in the caller's layout when nothing is
sorted) and the sorts take the fast argsort route (``baatt.selection.sorting``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.sorting import norm_sort
from baatt.validation import check_qk

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockStats:
    """Per-block mean, per-channel (population) variance and valid-token count.

    mean, var: [B, H, N, D] float32 (var None where it was not needed: no compensation);
    count: [B, H, N] float32.
    """

    mean: jax.Array
    var: jax.Array | None
    count: jax.Array


def block_stats(x: jax.Array, valid: jax.Array, block: int, *, with_var: bool = True) -> BlockStats:
    """x [B, H, N*block, D], valid bool [B, H, N*block] (or broadcastable) -> BlockStats.

    Empty blocks get mean 0, var 0, count 0. with_var=False: var is None (one read of x fewer).
    """
    xb = layout.block_view(x.astype(jnp.float32), block)
    vb = layout.block_view(jnp.broadcast_to(valid, x.shape[:3]), block)[..., None]
    mean, var, count = _masked_moments(xb, vb, axis=-2, with_var=with_var)  # count [B, H, N, 1]
    return BlockStats(mean, var, count[..., 0])


def _masked_moments(xb, vb, axis: int, with_var: bool = True):
    """Mean, population variance and count (float32) of xb over ``axis``, counting only where vb is True
    (vb None: everywhere).

    Empty groups give mean 0 and var 0. count keeps ``axis`` out (the shape of the reduction of vb).
    with_var=False: var is None and the mean is one plain sum.
    With the variance, both come from one variadic reduction (one read of xb; a centred second pass
    reads Q and K again, and XLA materialised a float32 copy of them for the two consumers):
    mean = s + E[x - s], var = E[(x - s)^2] - E[x - s]^2, with s each group's first element (0 where
    that one is not valid); the shift keeps the cancellation of E[x^2] - E[x]^2 away when |mean| >> spread.
    """
    ax = axis % xb.ndim
    if vb is None:  # every element valid: no masks to reduce, the shift is each group's first element
        vb = True
        count = jnp.full(xb.shape[:ax] + (1,) * (xb.ndim - ax - 1), xb.shape[ax], jnp.float32)
        shift = lax.slice_in_dim(xb, 0, 1, axis=ax)
    else:
        count = jnp.sum(vb, axis=axis, dtype=jnp.float32)
    denom = jnp.maximum(count, 1.0)
    if not with_var:
        return jnp.sum(jnp.where(vb, xb, 0.0), axis=axis) / denom, None, count
    if vb is not True:
        # Each group's first element when it is valid (padding and sorted-away keys sit at the ends),
        # else 0. A slice rather than a search for the first valid element: that search over a
        # constant mask made XLA constant-fold for seconds.
        first = lambda a: lax.slice_in_dim(a, 0, 1, axis=ax)
        shift = jnp.where(first(vb), first(xb), 0.0)
    dev = jnp.where(vb, xb - shift, 0.0)
    s1, s2 = lax.reduce((dev, dev * dev), (jnp.float32(0), jnp.float32(0)),
                        lambda a, b: (a[0] + b[0], a[1] + b[1]), (ax,))
    s1, s2 = s1 / denom, s2 / denom
    mean = jnp.where(count > 0, jnp.squeeze(shift, axis) + s1, 0.0)
    return mean, jnp.maximum(s2 - s1 * s1, 0.0), count


def block_stats_positional(x: jax.Array, valid: jax.Array | None, block: int, *, with_var: bool = True) -> BlockStats:
    """:func:`block_stats` of x [B, L, H, D] in its own layout; valid bool [B, L] or None (all valid).

    The same statistics as ``block_stats`` on the head-major copy ``to_block_space`` makes, without
    making it: the block reductions read x where it lies and only the [B, N, H, D] results are
    transposed, so unsorted statistics cost one read of x (with the variance too) instead of a
    transposed copy plus those reads. Used when no permutation is applied.
    """
    b, length, h, d = x.shape
    n = -(-length // block)
    pad = n * block - length
    if pad:  # the padding rows are invalid, so a mask is needed even where none was given
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.ones((b, length), jnp.bool_) if valid is None else valid
        valid = jnp.pad(valid, ((0, 0), (0, pad)), constant_values=False)
    xb = x.reshape(b, n, block, h, d).astype(jnp.float32)
    vb = None if valid is None else valid.reshape(b, n, block)[:, :, :, None, None]
    mean, var, count = _masked_moments(xb, vb, axis=2, with_var=with_var)  # [B, N, H, D], count [B, N, 1, 1]
    heads_major = lambda a: None if a is None else jnp.transpose(a, (0, 2, 1, 3))
    count = jnp.broadcast_to(count.reshape(b, n)[:, None, :], (b, h, n))
    return BlockStats(heads_major(mean), heads_major(var), count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Estimate:
    """Everything the estimator computed, in (possibly sorted) block space.

    scores: [B, Hq, Nq, Nk] float32 block logits (``-inf`` for key blocks with
    no valid key); q_perm [B, Hq, Lq] / k_perm [B, Hkv, Lk] or None;
    q_stats / k_stats: BlockStats of the blocked Q ([B, Hq, ...]) and K ([B, Hkv, ...]); their var
    is None unless the config compensates.
    """

    scores: jax.Array
    q_perm: jax.Array | None
    k_perm: jax.Array | None
    q_stats: BlockStats
    k_stats: BlockStats


def sort_permutations(q, k, config: BAConfig, key_mask=None):
    """(q_perm, k_perm), each None when that sort is off (docs/spec.md section 4)."""
    q_perm = norm_sort(q)[0] if config.sort_q else None
    k_perm = norm_sort(k, mask=key_mask)[0] if config.sort_k else None
    return q_perm, k_perm


def pooled_scores(q_stats: BlockStats, k_stats: BlockStats, config: BAConfig, head_dim: int) -> jax.Array:
    """Block logits from pooled statistics, [B, Hq, Nq, Nk].

    l_bar = Qbar.Kbar / sqrt(d)                                   (docs/spec.md section 2)
    Delta = (1/d) sum_t VarQ Kbar^2 + VarK Qbar^2 + VarQ VarK     (docs/spec.md section 5)
    score = l_bar + beta * Delta [+ log(valid keys)]              (count term: [ours])
    """
    hq, hkv = q_stats.mean.shape[1], k_stats.mean.shape[1]
    hm = layout.head_map(hq, hkv)
    km, kc = (jnp.take(a, hm, axis=1) for a in (k_stats.mean, k_stats.count))
    qm = q_stats.mean
    if config.compensate:
        # One contraction over [Qbar/sqrt(d), c VarQ, c Qbar^2] . [Kbar, Kbar^2 + VarK, VarK], c = beta/d:
        # l_bar + beta*Delta without four [Nq, Nk] products summed afterwards.
        qv, kv = q_stats.var, jnp.take(k_stats.var, hm, axis=1)
        c = config.beta / head_dim
        qcat = jnp.concatenate([qm / math.sqrt(head_dim), c * qv, c * qm * qm], axis=-1)
        kcat = jnp.concatenate([km, km * km + kv, kv], axis=-1)
        scores = jnp.einsum("bhad,bhnd->bhan", qcat, kcat, precision=HIGHEST)
    else:
        scores = jnp.einsum("bhad,bhnd->bhan", qm, km, precision=HIGHEST) / math.sqrt(head_dim)
    if config.count_correction:
        scores = scores + jnp.log(jnp.maximum(kc, 1.0))[:, :, None, :]
    return jnp.where(kc[:, :, None, :] > 0, scores, -jnp.inf)


def estimate(q, k, config: BAConfig, *, key_mask=None) -> Estimate:
    """Sort (optional), pool, score. The whole BA-Att estimator in one function."""
    check_qk(q, k, key_mask=key_mask)
    return _estimate_jit(q, k, key_mask, config)


@functools.partial(jax.jit, static_argnums=(3,))
def _estimate_jit(q, k, key_mask, config):
    q_perm, k_perm = sort_permutations(q, k, config, key_mask)
    if q_perm is None:
        q_stats = block_stats_positional(q, None, config.block_q, with_var=config.compensate)
    if k_perm is None:
        k_stats = block_stats_positional(k, key_mask, config.block_k, with_var=config.compensate)
    if q_perm is not None or k_perm is not None:
        space = layout.to_block_space(
            q, k, None, block_q=config.block_q, block_k=config.block_k,
            key_mask=key_mask, q_perm=q_perm, k_perm=k_perm,
        )
        if q_perm is not None:
            q_stats = block_stats(space.q, space.q_valid[:, None, :], config.block_q, with_var=config.compensate)
        if k_perm is not None:
            k_stats = block_stats(space.k, space.kv_valid, config.block_k, with_var=config.compensate)
    scores = pooled_scores(q_stats, k_stats, config, q.shape[-1])
    return Estimate(scores, q_perm, k_perm, q_stats, k_stats)
