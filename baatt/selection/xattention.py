"""XAttention: antidiagonal scoring of strided block pairs (docs/spec.md section 9).

Follows XAttention (Xu et al., arXiv 2503.16428). With stride ``S``:

- strided key row ``j`` concatenates the keys ``j*S + t`` and strided query row
  ``i`` concatenates the queries ``i*S + (S - 1 - t)`` over ``t = 0..S-1``, so
  one dot product of the two ``S*d``-long rows is the sum of an ``S``-long
  antidiagonal of the full logit map;
- those sums are divided by ``sqrt(d) * S`` (the mean logit of the
  antidiagonal) and softmax-normalised over all strided keys;
- the probabilities are summed per (query block, key block) pair, i.e. over
  ``block_q / S`` strided query rows and ``block_k / S`` strided key columns,
  and each row is normalised into a distribution over key blocks.

The log of that distribution is the block score and the distribution itself
is the mass the ``tau`` budget accumulates, so ``tau`` is XAttention's
cumulative threshold (they recommend 0.9-0.95).

Where we deviate from the paper / its public code:

- Bidirectional by default, and the sink blocks are not kept unconditionally
  (use the config's ``force_sink`` / ``local_window`` for that). Under a causal
  ``config.mask`` a strided key row counts for a strided query row only when
  the mask lets some of its pairs through (their estimate masks the strided
  map the same way); on the diagonal of a token-causal mask, where only the
  pairs ``t <= (S - 1) / 2`` of the antidiagonal are allowed, the logit is
  the mean over those pairs alone [ours: theirs keeps the whole antidiagonal,
  future keys included]. The diagonal key blocks are always kept (the shared
  budget step).
- The budget step is the shared one (``common.finish``): under ``tau`` it keeps
  the fewest blocks whose mass reaches ``tau`` (their code also ranks by mass
  and stops at the threshold); under ``sparsity`` it keeps the top ``kmax``
  blocks by mass, which XAttention itself does not offer.
- Padding and ``key_mask``: masked or padded keys are zeroed before the strided
  dot products (they contribute nothing), a strided key row with no valid key
  gets ``-inf`` before the softmax, and a strided query row made only of
  padding rows is dropped from the block sums (their code pads with zeros and
  zeroes the padded query rows' probabilities the same way).
- GQA: query head ``h`` is scored against kv head ``h // (Hq // Hkv)``.
- The block sums are accumulated in log space (log-sum-exp), so blocks whose
  mass underflows float32 keep a finite, correctly ranked score.
- ``block_q`` and ``block_k`` must be multiples of the stride (so that a
  strided row never straddles two blocks); ``BAConfig`` checks ``block_q``
  against the ``xattn_stride`` keyword when it is built.

Parameters: ``XAttentionParams`` (``BAConfig(xattn_stride=...)`` or
``BAConfig(selector_params=XAttentionParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import (
    finish,
    key_block_counts,
    mask_empty,
    mask_hidden,
    normalised_rows,
    positional_space,
)
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST

# Elements of the strided logit tile computed at once (per lax.map step); bounds memory.
_TILE_ELEMENTS = 1 << 25


@dataclasses.dataclass(frozen=True)
class XAttentionParams:
    """stride: the antidiagonal stride ``S`` (``BAConfig(xattn_stride=...)``)."""

    stride: int = 8

    def __post_init__(self):
        if not isinstance(self.stride, int) or self.stride < 1:
            raise SelectorParamError(self, "stride", "must be an int >= 1")


def _stride(config: BAConfig) -> int:
    """The stride this config runs with, after checking that it divides both block sizes."""
    stride = config.params_for("xattention").stride
    for name, block in (("block_q", config.block_q), ("block_k", config.block_k)):
        if block % stride:
            raise ValueError(f"xattention needs {name} ({block}) to be a multiple of the stride "
                             f"(xattn_stride / XAttentionParams.stride = {stride})")
    return stride


def strided_rows(space, stride: int):
    """Strided query and key rows of a positional block space.

    Returns (qs [B, Hq, Lq_pad/S, S*D], qs_valid bool [B, Lq_pad/S],
    ks [B, Hkv, Lk_pad/S, S*D], ks_valid bool [B, Hkv, Lk_pad/S]). Query row
    ``i`` is ``concat_t q[i*S + S-1-t]``, key row ``j`` is ``concat_t k[j*S + t]``;
    padded / masked tokens are zero, a row is valid when it holds a valid token.
    """
    b, hq, lq, d = space.q.shape
    hkv, lk = space.k.shape[1], space.k.shape[2]
    q = jnp.where(space.q_valid[:, None, :, None], space.q.astype(jnp.float32), 0.0)
    k = jnp.where(space.kv_valid[..., None], space.k.astype(jnp.float32), 0.0)
    qs = q.reshape(b, hq, lq // stride, stride, d)[:, :, :, ::-1, :].reshape(b, hq, lq // stride, stride * d)
    ks = k.reshape(b, hkv, lk // stride, stride * d)
    qs_valid = jnp.any(space.q_valid.reshape(b, lq // stride, stride), axis=-1)
    ks_valid = jnp.any(space.kv_valid.reshape(b, hkv, lk // stride, stride), axis=-1)
    return qs, qs_valid, ks, ks_valid


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> tuple[jax.Array, jax.Array]:
    """(log mass, mass), both [B, Hq, Nq, Nk] float32; each mass row sums to 1.

    Key blocks with no valid key get log mass ``-inf`` and mass 0.
    """
    stride = _stride(config)
    space = positional_space(q, k, config, key_mask)
    qs, qs_valid, ks, ks_valid = strided_rows(space, stride)
    b, hq, nrows, sd = qs.shape
    hkv, ncols = ks.shape[1], ks.shape[2]
    group = hq // hkv
    nq, nk = space.num_q_blocks, space.num_k_blocks
    rq, rk = config.block_q // stride, config.block_k // stride
    scale = 1.0 / (math.sqrt(q.shape[-1]) * stride)

    # Per query block: [B, Hkv, G, rq, S*D] strided rows and [B, rq] row validity.
    qb = jnp.moveaxis(qs.reshape(b, hkv, group, nq, rq, sd), 3, 0)
    qvb = jnp.moveaxis(qs_valid.reshape(b, nq, rq), 1, 0)
    col_ok = ks_valid[:, :, None, None, :]  # [B, Hkv, 1, 1, ncols]
    span = config.mask.span
    if span == 1:
        diagonal = _diagonal_logits(qs, ks, stride, q.shape[-1])  # [B, Hq, min(nrows, ncols)]
        diagonal = jnp.pad(diagonal, ((0, 0), (0, 0), (0, nrows - diagonal.shape[-1])))
        db = jnp.moveaxis(diagonal.reshape(b, hkv, group, nq, rq), 3, 0)
    else:
        db = jnp.zeros((nq,))

    def one_block(args):
        a, qa, qva, da = args
        s = jnp.einsum("bhgrx,bhcx->bhgrc", qa, ks, precision=HIGHEST) * scale
        s = jnp.where(col_ok, s, -jnp.inf)
        if span is not None:
            row = a * rq + jnp.arange(rq)[:, None]  # strided query rows of the block
            col = jnp.arange(ncols)[None, :]
            s = jnp.where(col * stride < config.mask.key_limit(row * stride + stride - 1), s, -jnp.inf)
            if span == 1:
                s = jnp.where((col == row) & (s > -jnp.inf), da[..., None], s)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        logp = jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)
        logp = jnp.where(qva[:, None, None, :, None], logp, -jnp.inf)
        logp = logp.reshape(b, hkv, group, rq, nk, rk)
        blk = jax.nn.logsumexp(logp, axis=(3, 5))  # [B, Hkv, G, Nk]
        return blk.reshape(b, hq, nk)

    per_step = b * hq * rq * ncols
    batch = max(1, min(nq, _TILE_ELEMENTS // max(per_step, 1)))
    blk = jax.lax.map(one_block, (jnp.arange(nq), qb, qvb, db), batch_size=batch)  # [Nq, B, Hq, Nk]
    blk = jnp.moveaxis(blk, 0, 2)
    row = jax.nn.logsumexp(blk, axis=-1, keepdims=True)
    log_mass = jnp.where(jnp.isfinite(row), blk - row, -jnp.inf)
    kcount = key_block_counts(space.kv_valid, config.block_k, hq)
    log_mass = mask_hidden(mask_empty(log_mass, kcount), q, k, config)
    return log_mass, jnp.exp(log_mass)


def _diagonal_logits(qs, ks, stride: int, head_dim: int) -> jax.Array:
    """Token-causal diagonal cells: strided row ``r`` against strided key row ``r``, the mean logit over
    the antidiagonal pairs ``(r*S + S-1-t, r*S + t)`` with ``t <= (S - 1) / 2`` (key not after query).
    [B, Hq, min(rows, cols)]."""
    b, hq, nrows, sd = qs.shape
    hkv, ncols = ks.shape[1], ks.shape[2]
    n = min(nrows, ncols)
    allowed = jnp.arange(stride) <= (stride - 1) // 2
    kh = jnp.where(allowed[:, None], ks[:, :, :n].reshape(b, hkv, n, stride, -1), 0.0).reshape(b, hkv, n, sd)
    kh = jnp.repeat(kh, hq // hkv, axis=1)
    pairs = (stride - 1) // 2 + 1
    return jnp.sum(qs[:, :, :n] * kh, axis=-1) / (math.sqrt(head_dim) * pairs)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    scores, mass = block_scores(q, k, config, key_mask=key_mask)
    return finish(scores, q, k, config, probs=mass)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The block mass, rows normalised."""
    return normalised_rows(block_scores(q, k, config, key_mask=key_mask)[1])


register_selector("xattention", select=select, block_map=block_map, params=XAttentionParams)
