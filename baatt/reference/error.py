"""Formal approximation-error metrics (docs/spec.md section 3).

Everything works in a block space (positional, or norm-sorted through
``q_perm`` / ``k_perm``) and streams over key blocks, so the metrics run at
long lengths without an L x L matrix.

Under a causal or block-causal mask every metric is taken under that mask: the
oracle map (``post_downsample_map(..., mask=selection.mask)``) and dense output
(``dense_attention(..., mask=...)``) are computed with it, so the mass, recall,
TV, KL and output error compare like with like; ``bound`` and
``logit_deviation`` take the mask and count only the (query, key) pairs it allows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.attention_mask import AttentionMask, resolve_mask
from baatt.reference.downsample import _stream_logits, block_moments, row_logsumexp
from baatt.selection.types import BlockSelection

HIGHEST = jax.lax.Precision.HIGHEST
_TINY = 1e-30


def _space(q, k, block_size, block_size_k, key_mask, q_perm, k_perm, mask=None):
    return layout.to_block_space(
        q, k, None, block_q=block_size, block_k=block_size if block_size_k is None else block_size_k,
        key_mask=key_mask, q_perm=q_perm, k_perm=k_perm, mask=resolve_mask(False, mask),
    )


def _allowed_pairs(q, k, space: layout.BlockSpace) -> jax.Array | None:
    """bool [Nq, Nk]: block pairs the space's mask allows (None when bidirectional)."""
    if space.mask.is_bidirectional:
        return None
    return jnp.asarray(space.mask.block_pairs(q.shape[1], k.shape[1], space.block_q, space.block_k)[0])


def _radius_and_max_norm(x: jax.Array, valid: jax.Array, block: int):
    """Block radius R = max ||x_i - mean|| and max norm M = max ||x_i|| over valid tokens: [B, H, N] each."""
    mean, _, _ = block_moments(x, valid, block)
    xb = layout.block_view(x.astype(jnp.float32), block)
    vb = layout.block_view(jnp.broadcast_to(valid, x.shape[:3]), block)
    dist = jnp.linalg.norm(xb - mean[..., None, :], axis=-1)
    norm = jnp.linalg.norm(xb, axis=-1)
    return jnp.max(jnp.where(vb, dist, 0.0), -1), jnp.max(jnp.where(vb, norm, 0.0), -1)


@functools.partial(jax.jit, static_argnames=("block_size", "block_size_k", "mask"))
def bound(q, k, *, block_size: int, block_size_k: int | None = None, key_mask=None, q_perm=None, k_perm=None,
          mask: AttentionMask | None = None):
    """The deviation bound U [B, Hq, Nq, Nk]:

    |l_ij - l_bar[a,b]| <= U[a,b] = (R^Q_a M^K_b + M^Q_a R^K_b + R^Q_a R^K_b) / sqrt(d).

    ``mask``: pairs of blocks the attention mask hides get 0 (the bound still holds on the
    pairs it allows: it holds for every token pair of the blocks).
    """
    space = _space(q, k, block_size, block_size_k, key_mask, q_perm, k_perm, mask)
    rq, mq = _radius_and_max_norm(space.q, space.q_valid[:, None, :], space.block_q)
    rk, mk = _radius_and_max_norm(space.k, space.kv_valid, space.block_k)
    hm = layout.head_map(q.shape[2], k.shape[2])
    rk, mk = jnp.take(rk, hm, axis=1), jnp.take(mk, hm, axis=1)
    rq, mq = rq[..., :, None], mq[..., :, None]
    rk, mk = rk[..., None, :], mk[..., None, :]
    u = (rq * mk + mq * rk + rq * rk) / math.sqrt(q.shape[-1])
    allowed = _allowed_pairs(q, k, space)
    return u if allowed is None else jnp.where(allowed, u, 0.0)


@functools.partial(jax.jit, static_argnames=("block_size", "block_size_k", "reduce", "mask"))
def logit_deviation(
    q, k, *, block_size: int, block_size_k: int | None = None, key_mask=None, q_perm=None, k_perm=None,
    reduce: str = "max", mask: AttentionMask | None = None,
):
    """Actual deviation |l_ij - l_bar[a,b]| per block pair, reduced by ``max`` or ``mean``: [B, Hq, Nq, Nk].

    ``l_bar`` is the uncompensated pooled logit (docs/spec.md section 2). Pairs with
    no valid key are 0. Streamed over key blocks. ``mask``: only the (query, key) pairs
    the attention mask allows count; pairs of blocks it hides are 0.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean'; got {reduce!r}")
    space = _space(q, k, block_size, block_size_k, key_mask, q_perm, k_perm, mask)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_mean, _, _ = block_moments(space.q, space.q_valid[:, None, :], space.block_q)
    k_mean, _, _ = block_moments(space.k, space.kv_valid, space.block_k)
    hm = layout.head_map(q.shape[2], k.shape[2])
    l_bar = jnp.einsum("bhad,bhnd->bhan", q_mean, jnp.take(k_mean, hm, axis=1), precision=HIGHEST) * scale
    logits = _stream_logits(space, scale)
    b, hq = q.shape[0], q.shape[2]
    nq, bq = space.num_q_blocks, space.block_q
    qv = space.q_valid.reshape(b, 1, nq, bq, 1)
    kvb = jnp.take(layout.block_view(space.kv_valid, space.block_k), hm, axis=1)  # [B, Hq, Nk, bk]

    def per_key_block(j):
        s = logits(j).reshape(b, hq, nq, bq, -1)
        live = qv & kvb[:, :, j][:, :, None, None, :] & (s > -jnp.inf)  # the mask's hidden pairs are -inf
        dev = jnp.where(live, jnp.abs(s - l_bar[:, :, :, j][..., None, None]), 0.0)
        if reduce == "max":
            return jnp.max(dev, axis=(-1, -2))
        return jnp.sum(dev, axis=(-1, -2)) / jnp.maximum(jnp.sum(live, axis=(-1, -2)), 1)

    return jnp.moveaxis(jax.lax.map(per_key_block, jnp.arange(space.num_k_blocks)), 0, -1)


def pearson(x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Pearson correlation of two arrays over all entries (or the True entries of ``mask``)."""
    x = x.astype(jnp.float32).ravel()
    y = y.astype(jnp.float32).ravel()
    w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(jnp.float32).ravel()
    n = jnp.maximum(jnp.sum(w), 1.0)
    mx, my = jnp.sum(w * x) / n, jnp.sum(w * y) / n
    cov = jnp.sum(w * (x - mx) * (y - my))
    return cov / jnp.sqrt(jnp.maximum(jnp.sum(w * (x - mx) ** 2) * jnp.sum(w * (y - my) ** 2), _TINY))


def total_variation(m_hat: jax.Array, m: jax.Array) -> jax.Array:
    """Per-row total variation distance 0.5 * sum_b |M_hat - M|: [B, H, Nq], in [0, 1]."""
    return 0.5 * jnp.sum(jnp.abs(m_hat - m), axis=-1)


def kl_divergence(m_hat: jax.Array, m: jax.Array) -> jax.Array:
    """Per-row KL(M_hat || M) = sum_b M_hat log(M_hat / M): [B, H, Nq] (0 log 0 = 0)."""
    ratio = jnp.log(jnp.maximum(m_hat, _TINY)) - jnp.log(jnp.maximum(m, _TINY))
    return jnp.sum(jnp.where(m_hat > 0, m_hat * ratio, 0.0), axis=-1)


def selected_mass(m_hat: jax.Array, selection: BlockSelection) -> jax.Array:
    """Oracle mass that the selection keeps, per row: [B, H, Nq]."""
    return jnp.sum(jnp.where(selection.kept_mask(m_hat.shape[-1]), m_hat, 0.0), axis=-1)


def best_mass(m_hat: jax.Array, counts: jax.Array) -> jax.Array:
    """Largest oracle mass any ``counts`` blocks could keep, per row: [B, H, Nq]."""
    ranked = jnp.cumsum(-jnp.sort(-m_hat, axis=-1), axis=-1)
    return jnp.take_along_axis(ranked, (counts - 1)[..., None], axis=-1)[..., 0]


def oracle_recall(m_hat: jax.Array, selection: BlockSelection) -> jax.Array:
    """Oracle mass kept by the selection over the best mass of the same number of blocks: [B, H, Nq] in [0, 1].

    ``m_hat`` must be in the selection's block space.
    """
    return selected_mass(m_hat, selection) / jnp.maximum(best_mass(m_hat, selection.counts), _TINY)


def relative_output_error(out: jax.Array, ref: jax.Array, *, axis=None) -> jax.Array:
    """||out - ref|| / ||ref|| (Frobenius over ``axis``, default all)."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    num = jnp.sqrt(jnp.sum((out - ref) ** 2, axis=axis))
    return num / jnp.maximum(jnp.sqrt(jnp.sum(ref**2, axis=axis)), _TINY)


# -- per query token: the tails that block averages hide ------------------------------------


def query_mass(q, k, selection: BlockSelection, *, key_mask=None, scale: float | None = None) -> jax.Array:
    """Per query token, the share of its softmax mass inside the key blocks kept for its query
    block: [B, Hq, Lq] in [0, 1], positional order.

    ``selected_mass`` averages this over the queries of a block; kept apart, it shows the queries
    a selection starves (docs/spec.md section 10.1). The softmax is the exact one over every
    valid key (under ``selection.mask``, every key the query may see), computed in the
    selection's block space (``q_perm`` / ``k_perm``) and streamed over key blocks twice (log-sum-exp,
    then kept mass), never forming ``L x L``. A query that sees no key loses nothing: 1.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _query_mass_jit(q, k, selection, key_mask, scale)


@functools.partial(jax.jit, static_argnums=(4,))
def _query_mass_jit(q, k, selection, key_mask, scale):
    space = layout.to_block_space(q, k, None, block_q=selection.block_q, block_k=selection.block_k,
                                  key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm,
                                  mask=selection.mask)
    lse = row_logsumexp(space, scale)
    sees_keys = jnp.isfinite(lse)
    lse = jnp.where(sees_keys, lse, 0.0)
    logits = _stream_logits(space, scale)
    kept = selection.kept_mask(space.num_k_blocks)  # [B, Hq, Nq, Nk]
    b, hq, lq_pad = lse.shape
    nq, bq = space.num_q_blocks, space.block_q

    def add_block(total, j):
        p = jnp.sum(jnp.exp(logits(j) - lse[..., None]), axis=-1).reshape(b, hq, nq, bq)
        return total + jnp.where(kept[..., j, None], p, 0.0), None

    total, _ = jax.lax.scan(add_block, jnp.zeros((b, hq, nq, bq)), jnp.arange(space.num_k_blocks))
    mass = jnp.where(sees_keys, total.reshape(b, hq, lq_pad), 1.0)[:, :, : q.shape[1]]
    if selection.q_perm is None:
        return mass
    return jnp.take_along_axis(mass, layout.invert_permutation(selection.q_perm), axis=2)


def query_mass_tails(mass: jax.Array, *, quantile: float = 0.05, threshold: float = 0.5) -> dict[str, jax.Array]:
    """Summary of per-query masses (``query_mass``, any shape) over all their entries:
    ``mean``, ``low_quantile`` (the ``quantile``-th quantile, default the 5th percentile) and
    ``below_threshold`` (the share of queries keeping less than ``threshold`` of their mass)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1]; got {quantile!r}")
    mass = jnp.asarray(mass, jnp.float32).ravel()
    return dict(mean=jnp.mean(mass), low_quantile=jnp.quantile(mass, quantile),
                below_threshold=jnp.mean(mass < threshold))
