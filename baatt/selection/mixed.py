"""Mixed estimator: exact softmax rows of a few probe queries, combined with a fine group-pooled estimate.

Two estimates of the oracle map ``M_hat`` (docs/spec.md section 1), each cheap and each blind
where the other sees:

- probe mass ``P[a, b]``: the exact softmax over all valid keys of ``probes`` queries of query
  block ``a``, evenly strided (the centres of ``probes`` equal slices of the block; in a ragged
  last block, clipped to its last real query), summed over the keys of block ``b`` and averaged
  over the probes. Exact at token level on the key side: a single needle key counts fully.
- group mass ``G[a, b]``: queries and keys mean-pooled in groups of ``group`` tokens; every query
  group takes a softmax over all key groups of ``Qg . Kg / sqrt(d)`` (``+ log n`` valid keys of
  the key group with ``BAConfig.count_correction``), the key groups of block ``b`` are summed
  and the query groups of block ``a`` averaged, weighted by their real queries. Mean pooling
  (section 2) at a finer grain: every query and every key is seen.

Combination (``blend``):

- ``None`` (default): half the budget from each. Key blocks are ranked by interleaving the two
  rankings, ``P``'s best, ``G``'s best, ``P``'s second, ``G``'s second, ..., skipping a block
  already taken, so a fixed budget of ``k`` blocks keeps the top ``ceil(k/2)`` of ``P`` and fills
  the rest from ``G``'s ranking. The mass of the ``tau`` and peak rules is ``(P + G) / 2``,
  accumulated in that interleaved order.
- a weight ``w`` in ``[0, 1]``: ranked by the blend ``w * P + (1 - w) * G``, which is also the mass.

docs/spec.md section 10.1 measured this recipe (one probe, groups of 16, half the budget each,
sink forced) within 0.002 / 0.005 / 0.016 of the oracle's mass at 50 / 70 / 90% sparsity.

Cost, as a fraction of dense attention's ``4 * Lq * Lk * d`` FLOPs: the probe rows take
``2 * probes * Nq * Lk * d`` and the group logits ``2 * (Lq / group) * (Lk / group) * d``, so

    probes / (2 * block_q) + 1 / (2 * group^2)

0.59% at the defaults (1 probe, groups of 16) with block_q = 128, 0.98% with block_q = 64.
Memory: both are computed a few query blocks at a time (``probes x Lk`` and
``block_q / group x Lk / group`` per block), never ``L x L``.

Under a causal or block-causal ``BAConfig.mask`` each probe's softmax runs over the keys it may
see, and a query group's softmax over the key groups that every query of the group may see
whole: a group the mask cuts (on the diagonal of a causal mask) is left to the probes, and a
query group that sees no whole key group drops out of its block's average. No statistic of a
future key enters either estimate.

Blocks are positional (``BAConfig`` refuses sorting, clustering and compensation for it);
``group`` must divide both block sizes and ``probes`` may not exceed ``block_q``. GQA: query
head ``h`` uses kv head ``h // (Hq // Hkv)``.

Parameters: ``MixedParams`` (``BAConfig(selector="mixed", selector_params=MixedParams(...))``).
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
    key_limits,
    log_count,
    map_query_blocks,
    masked_keys,
    query_blocks,
    visible_keys,
)
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MixedParams:
    """probes: exact query rows per query block; group: tokens per pooled group;
    blend: None to split the budget between the two estimates, or the weight of the probe mass."""

    probes: int = 1
    group: int = 16
    blend: float | None = None

    def __post_init__(self):
        for name in ("probes", "group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SelectorParamError(self, name, "must be an int >= 1")
        b = self.blend
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0):
            raise SelectorParamError(self, "blend", "must be None or a number in [0, 1]")


def _params(config: BAConfig) -> MixedParams:
    params = config.params_for("mixed")
    for name, block in (("block_q", config.block_q), ("block_k", config.block_k)):
        if block % params.group:
            raise ValueError(f"mixed needs {name} ({block}) to be a multiple of MixedParams.group ({params.group})")
    if params.probes > config.block_q:
        raise ValueError(f"mixed needs MixedParams.probes ({params.probes}) <= block_q ({config.block_q})")
    return params


def probe_offsets(block_q: int, probes: int) -> jax.Array:
    """Offsets [probes] of the probe queries inside a query block: the centres of ``probes`` equal slices."""
    return (2 * jnp.arange(probes) + 1) * block_q // (2 * probes)


def log_masses(q, k, config: BAConfig, *, key_mask=None) -> tuple[jax.Array, jax.Array]:
    """``(log P, log G)``, each [B, Hq, Nq, Nk] float32 with rows summing to 1 in linear space
    (``-inf`` for key blocks without a valid key and for those ``config.mask`` hides)."""
    params = _params(config)
    space = positional_space(q, k, config, key_mask)
    k_valid = masked_keys(space)
    b, hkv, lk, d = k_valid.shape
    nk, bq, g = space.num_k_blocks, config.block_q, params.group
    scale = 1.0 / math.sqrt(d)
    key_ok = space.kv_valid[:, :, None, None, :]
    # Key groups: mean of the valid keys and their count, [B, Hkv, Lk/g, D] and [B, Hkv, Lk/g].
    k_count = jnp.sum(space.kv_valid.reshape(b, hkv, lk // g, g), axis=-1).astype(jnp.float32)
    k_group = jnp.sum(k_valid.reshape(b, hkv, lk // g, g, d), axis=-2) / jnp.maximum(k_count, 1.0)[..., None]
    group_bias = log_count(k_count, config.count_correction)
    offsets = probe_offsets(bq, params.probes)

    def block_log_mass(log_p):  # [..., Lk or Lk/g] token or group log-probabilities -> [..., Nk]
        return jax.nn.logsumexp(log_p.reshape(log_p.shape[:-1] + (nk, -1)), axis=-1)

    def normalised(s):
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        return jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)

    def one_block(args):
        a, qa, qva = args  # block id, [B, Hkv, G, bq, D], [B, bq]
        # Probes, clipped to the block's last real query.
        n_real = jnp.sum(qva, axis=-1)  # [B]
        pos = jnp.minimum(offsets[None, :], jnp.maximum(n_real[:, None] - 1, 0))  # [B, probes]
        probe = jnp.take_along_axis(qa, pos[:, None, None, :, None], axis=3)  # [B, Hkv, G, probes, D]
        s = jnp.einsum("bhgpd,bhkd->bhgpk", probe, k_valid, precision=HIGHEST) * scale
        limit = key_limits(space, a * bq + pos)  # [B, probes] or None
        seen = visible_keys(key_ok, None if limit is None else limit[:, None, None, :])
        log_p = block_log_mass(normalised(jnp.where(seen, s, -jnp.inf)))  # [B, Hkv, G, probes, Nk]
        log_probe = jax.nn.logsumexp(log_p, axis=-2) - math.log(params.probes)
        # Query groups, weighted by their real queries.
        qv = qva.reshape(b, bq // g, g)
        q_count = jnp.sum(qv, axis=-1).astype(jnp.float32)  # [B, bq/g]
        q_group = jnp.sum(jnp.where(qv[:, None, None, :, :, None], qa.reshape(qa.shape[:3] + (bq // g, g, d)), 0.0),
                          axis=-2) / jnp.maximum(q_count, 1.0)[:, None, None, :, None]
        s = jnp.einsum("bhgrd,bhcd->bhgrc", q_group, k_group, precision=HIGHEST) * scale + group_bias[:, :, None, None]
        limit = key_limits(space, a * bq + jnp.arange(0, bq, g))  # of each query group's first query
        if limit is not None:
            group_end = jnp.minimum(jnp.arange(1, lk // g + 1) * g, k.shape[1])  # past its last real key
            whole = group_end[None, :] <= limit[:, None]  # [bq/g, Lk/g]
            s = jnp.where(whole, s, -jnp.inf)
            sees_some = jnp.any(whole & (k_count[:, 0, None, :] > 0), axis=-1)  # [B, bq/g]; same keys for all heads
            q_count = jnp.where(sees_some, q_count, 0.0)
        log_g = block_log_mass(normalised(s))  # [B, Hkv, G, bq/g, Nk]
        weight = jnp.log(q_count / jnp.maximum(jnp.sum(q_count, axis=-1, keepdims=True), 1.0))
        log_group = jax.nn.logsumexp(log_g + weight[:, None, None, :, None], axis=-2)
        return jnp.stack([log_probe, log_group], axis=-1)  # [B, Hkv, G, Nk, 2]

    per_block = b * q.shape[2] * max(params.probes * lk, (bq // g) * (lk // g))
    both = map_query_blocks(one_block, query_blocks(space), elements_per_block=per_block)  # [B, Hq, Nq, Nk, 2]
    return both[..., 0], both[..., 1]


def _rank(log_mass: jax.Array) -> jax.Array:
    """Position of each key block in its row's descending order (ties: lower block id first)."""
    order = jnp.argsort(-log_mass, axis=-1, stable=True)
    return layout.invert_permutation(order.astype(jnp.int32))


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> tuple[jax.Array, jax.Array]:
    """(scores, mass), both [B, Hq, Nq, Nk]: the ranking the budget step uses and the blended mass
    (rows sum to 1). Key blocks without a valid key get score ``-inf`` and mass 0."""
    blend = config.params_for("mixed").blend
    log_probe, log_group = log_masses(q, k, config, key_mask=key_mask)
    w = 0.5 if blend is None else float(blend)
    log_mass = jnp.logaddexp(jnp.log(jnp.float32(w)) + log_probe, jnp.log(jnp.float32(1.0 - w)) + log_group)
    valid = jnp.isfinite(log_probe) | jnp.isfinite(log_group)
    if blend is None:
        interleaved = jnp.minimum(2 * _rank(log_probe), 2 * _rank(log_group) + 1)
        scores = jnp.where(valid, -interleaved.astype(jnp.float32), -jnp.inf)
    else:
        scores = log_mass
    return scores, jnp.exp(log_mass)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    scores, mass = block_scores(q, k, config, key_mask=key_mask)
    return finish(scores, q, k, config, probs=mass)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The blended mass ``w * P + (1 - w) * G`` (``w = 1/2`` when the budget is split)."""
    return block_scores(q, k, config, key_mask=key_mask)[1]


register_selector("mixed", select=select, block_map=block_map, params=MixedParams)
