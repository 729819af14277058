"""Last-query vertical-slash selection (docs/spec.md section 9).

Follows MInference's vertical-slash pattern (Jiang et al., arXiv 2407.02490),
with the cumulative-mass rule that FlexPrefill (Lai et al., arXiv 2502.20766)
uses to size it:

1. exact softmax of the last ``n = size`` real queries against all
   valid keys, per query head;
2. vertical importance of key ``j``: the column sum of those probabilities;
   slash importance of offset ``o = j - i`` (key position minus query
   position): the sum of the probabilities along that diagonal. Both are
   normalised to distributions (each sums to 1);
3. keep the fewest (largest) verticals whose mass reaches ``gamma``
   and, separately, the fewest slashes that reach it;
4. map the kept lines to key blocks for every query block: a vertical at key
   ``j`` hits key block ``j // block_k`` in every row; a slash at offset ``o``
   hits, in query block ``a``, the key blocks touched by positions
   ``[a*bq + o, a_end + o]`` (``a_end`` the block's last real query);
5. block score = mass of the kept verticals plus kept slashes that hit the
   block; that mass is the ``probs`` of the shared budget step, its log the
   score.

Where we deviate:

- MInference keeps a fixed number of verticals and slashes per head (found by
  an offline search) and computes exactly those lines in a dedicated kernel;
  we keep lines by mass (FlexPrefill's ``gamma``), and we run them as whole
  blocks through the shared budget step (``common.finish``: sparsity top-k or
  ``tau`` with clamps, forced blocks) so that all selectors compare at equal
  budgets. MInference also always keeps the first keys and a local window
  (use ``force_sink`` / ``local_window`` for that).
- Bidirectional by default: offsets are both positive and negative. Under a
  causal ``config.mask`` the last queries' softmax runs over the keys each may
  see (as in MInference, whose pattern comes from causal LMs), so no line
  gets mass from a key its query may not see, and the block pairs the mask
  hides get no mass.
- Which queries: ``query_positions`` [B or 1, m] (``baatt.attention(query_positions=...)``)
  names them, in place of the last ones (``size`` is then unused); a masked-diffusion
  sampler gives the block being decoded, whose queries are the ones whose keys matter
  now (the last positions of a canvas are mask tokens at the far end of the generation).
  Positions are clamped into [0, Lq) (the API poisons the output for ones outside).
- "Real" queries: when ``key_mask`` is given and ``Lq == Lk`` (self-attention)
  the queries at masked positions are taken as padding too, and the last
  ``n`` queries are the last ``n`` unmasked positions of each batch row;
  otherwise the last ``n`` positions. A slash maps through each query block's
  real positions only (the ragged last block stops at ``Lq - 1``).
- Key blocks hit by no kept line have mass 0. So that the budget can still
  fill ``kmax`` blocks, they get a finite score far below any real one,
  ordered by a positional tiebreak: closer to the query block's diagonal
  first (distance between block centres, in key blocks), then lower block id
  (``- 0.25 * b / Nk``). Their mass (``probs``) stays 0, so under ``tau`` they
  are only reached when the lines' mass is already covered.
- Ties between lines of exactly equal mass at the gamma cut are all kept.

Parameters: ``LastQueryParams`` (``BAConfig(last_query_size=..., last_query_gamma=...)``
or ``BAConfig(selector_params=LastQueryParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import finish, key_block_counts, mask_empty, mask_hidden, normalised_rows
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST

# Score of a key block no kept line hits: far below any log mass (float32 log >= -104).
ZERO_MASS_SCORE = -1.0e4


@dataclasses.dataclass(frozen=True)
class LastQueryParams:
    """size: how many of the last real queries are scored (``last_query_size``);
    gamma: the mass the kept vertical and slash lines must each cover (``last_query_gamma``)."""

    size: int = 64
    gamma: float = 0.9

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise SelectorParamError(self, "size", "must be an int >= 1")
        if not 0.0 < self.gamma <= 1.0:
            raise SelectorParamError(self, "gamma", "must be in (0, 1]")


def last_queries(length_q: int, length_k: int, n: int, key_mask):
    """Positions [B, n] of the last ``n`` real queries and their validity [B, n] (descending order)."""
    batch = 1 if key_mask is None else key_mask.shape[0]
    pos = jnp.arange(length_q, dtype=jnp.int32)
    if key_mask is not None and length_q == length_k:
        prio = jnp.where(key_mask, pos[None, :], -1)
    else:
        prio = jnp.broadcast_to(pos[None, :], (batch, length_q))
    top, _ = jax.lax.top_k(prio, n)
    return jnp.maximum(top, 0), top >= 0


def keep_lines(mass: jax.Array, gamma: float) -> jax.Array:
    """bool mask over the last axis: the fewest largest entries whose sum reaches ``gamma`` of the total.

    Entries equal to the smallest kept value are kept too.
    """
    desc = -jnp.sort(-mass, axis=-1)
    cum = jnp.cumsum(desc, axis=-1)
    total = cum[..., -1:]
    count = jnp.sum(cum < gamma * total, axis=-1, keepdims=True) + 1
    count = jnp.minimum(count, mass.shape[-1])
    threshold = jnp.take_along_axis(desc, count - 1, axis=-1)
    return mass >= threshold


def given_queries(query_positions, length_q: int, length_k: int, key_mask):
    """Positions [B', m] of ``query_positions`` (clamped into range) and their validity (a padded query is not
    real, as in ``last_queries``)."""
    pos = jnp.clip(jnp.asarray(query_positions, jnp.int32), 0, length_q - 1)
    if key_mask is not None and length_q == length_k:
        pos = jnp.broadcast_to(pos, (max(pos.shape[0], key_mask.shape[0]), pos.shape[1]))
        return pos, jnp.take_along_axis(jnp.broadcast_to(key_mask, (pos.shape[0], length_q)), pos, axis=1)
    return pos, jnp.ones(pos.shape, jnp.bool_)


def line_masses(q, k, config: BAConfig, *, key_mask=None, query_positions=None) -> tuple[jax.Array, jax.Array]:
    """(vertical [B, Hq, Lk], slash [B, Hq, Lq + Lk - 1]) distributions.

    ``slash[..., o + Lq - 1]`` is the importance of offset ``o = key_pos - query_pos``.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    if query_positions is None:
        n = min(config.params_for("last_query").size, lq)
        qpos, qok = last_queries(lq, lk, n, key_mask)
    else:
        qpos, qok = given_queries(query_positions, lq, lk, key_mask)
        n = qpos.shape[1]
    qpos = jnp.broadcast_to(qpos, (b, n))
    qok = jnp.broadcast_to(qok, (b, n))
    kvalid = jnp.ones((b, lk), jnp.bool_) if key_mask is None else key_mask
    qq = jnp.take_along_axis(q.astype(jnp.float32), qpos[:, :, None, None], axis=1)  # [B, n, Hq, D]
    qq = qq.reshape(b, n, hkv, group, d)
    kk = jnp.where(kvalid[:, :, None, None], k.astype(jnp.float32), 0.0)
    s = jnp.einsum("bnhgd,bkhd->bhgnk", qq, kk, precision=HIGHEST) / math.sqrt(d)
    seen = kvalid[:, None, None, None, :]
    if not config.mask.is_bidirectional:
        limit = config.mask.key_limit(qpos)  # [B, n]
        seen = seen & (jnp.arange(lk) < limit[:, :, None])[:, None, None]
    s = jnp.where(seen, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.where(jnp.isfinite(lse), jnp.exp(s - lse), 0.0)
    p = jnp.where(qok[:, None, None, :, None], p, 0.0).reshape(b, hq, n, lk)
    nreal = jnp.maximum(jnp.sum(qok, axis=-1), 1).astype(jnp.float32)[:, None, None]
    vertical = jnp.sum(p, axis=2) / nreal
    offset = jnp.arange(lk, dtype=jnp.int32)[None, None, :] - qpos[:, :, None] + (lq - 1)  # [B, n, Lk]
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hq)[None, :, None, None]
    slash = jnp.zeros((b, hq, lq + lk - 1), jnp.float32).at[bi, hi, offset[:, None]].add(p)
    return vertical, slash / nreal


def block_scores(q, k, config: BAConfig, *, key_mask=None, query_positions=None) -> tuple[jax.Array, jax.Array]:
    """(scores, mass), both [B, Hq, Nq, Nk]: the kept lines' mass per block and its log.

    Blocks with no valid key get score ``-inf``; blocks no kept line hits get
    mass 0 and a score of ``ZERO_MASS_SCORE`` plus the positional tiebreak.
    """
    b, lq, hq, _ = q.shape
    lk = k.shape[1]
    bq, bk = config.block_q, config.block_k
    nq, nk = config.num_blocks(lq, lk)
    vertical, slash = line_masses(q, k, config, key_mask=key_mask, query_positions=query_positions)
    gamma = config.params_for("last_query").gamma
    v_kept = jnp.where(keep_lines(vertical, gamma), vertical, 0.0)
    s_kept = jnp.where(keep_lines(slash, gamma), slash, 0.0)

    v_pad = jnp.pad(v_kept, ((0, 0), (0, 0), (0, nk * bk - lk)))
    v_block = jnp.sum(v_pad.reshape(b, hq, nk, bk), axis=-1)  # [B, Hq, Nk]

    # Offsets hitting (a, b): [b*bk - a_hi, b_hi - a_lo], as prefix-sum differences.
    a_lo = jnp.arange(nq) * bq
    a_hi = jnp.minimum(a_lo + bq, lq) - 1
    b_lo = jnp.arange(nk) * bk
    b_hi = jnp.minimum(b_lo + bk, lk) - 1
    lo = b_lo[None, :] - a_hi[:, None] + (lq - 1)  # index into slash, >= 0
    hi = b_hi[None, :] - a_lo[:, None] + (lq - 1)  # <= Lq + Lk - 2
    csum = jnp.concatenate([jnp.zeros((b, hq, 1)), jnp.cumsum(s_kept, axis=-1)], axis=-1)
    # An exact count of positive kept slashes in the range makes empty ranges exactly 0.
    cnt = jnp.concatenate(
        [jnp.zeros((b, hq, 1), jnp.int32), jnp.cumsum((s_kept > 0).astype(jnp.int32), axis=-1)], axis=-1
    )
    take = lambda x, idx: jnp.take(x, idx.reshape(-1), axis=-1).reshape(x.shape[:2] + idx.shape)
    s_block = jnp.maximum(take(csum, hi + 1) - take(csum, lo), 0.0)
    s_block = jnp.where(take(cnt, hi + 1) > take(cnt, lo), s_block, 0.0)  # [B, Hq, Nq, Nk]

    mass = v_block[:, :, None, :] + s_block
    centre_q = (jnp.arange(nq) + 0.5) * bq
    centre_k = (jnp.arange(nk) + 0.5) * bk
    tiebreak = -jnp.abs(centre_k[None, :] - centre_q[:, None]) / bk - 0.25 * jnp.arange(nk)[None, :] / nk
    scores = jnp.where(mass > 0, jnp.log(jnp.where(mass > 0, mass, 1.0)), ZERO_MASS_SCORE + tiebreak)
    kvalid = jnp.ones((b, lk), jnp.bool_) if key_mask is None else key_mask
    kv_valid = jnp.pad(kvalid, ((0, 0), (0, nk * bk - lk)))[:, None, :]
    kcount = key_block_counts(kv_valid, bk, hq)
    scores = mask_hidden(mask_empty(scores, kcount), q, k, config)
    mass = jnp.where(scores > -jnp.inf, mass, 0.0)
    return scores, mass


def select(q, k, config: BAConfig, *, key_mask=None, query_positions=None) -> BlockSelection:
    scores, mass = block_scores(q, k, config, key_mask=key_mask, query_positions=query_positions)
    return finish(scores, q, k, config, probs=mass)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The kept lines' mass per block, rows normalised."""
    return normalised_rows(block_scores(q, k, config, key_mask=key_mask)[1])


register_selector("last_query", select=select, block_map=block_map, params=LastQueryParams, query_positions=True)
