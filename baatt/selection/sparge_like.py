"""SpargeAttn-like selection: pooled scores gated by block self-similarity (docs/spec.md section 9).

Follows the first stage of SpargeAttn (Zhang et al., arXiv 2502.18137):

1. mean-pool the Q blocks and the K blocks (valid tokens only);
2. each block's self-similarity is the mean cosine similarity of its valid
   tokens over all ordered pairs, self-pairs included (as in their kernel:
   the sum of the Gram matrix of the normalised tokens over ``n**2``), i.e.
   ``||sum_i q_i/||q_i||||**2 / n**2``;
3. a K block whose similarity is ``<= sim_threshold`` is not
   represented by its mean, so it is not ranked but always computed (forced
   for every query block); a Q block below the threshold attends to every
   valid key block;
4. the remaining K blocks are ranked by ``softmax(Qbar Kbar^T / sqrt(d))``
   taken over the ranked (similar, valid) K blocks only, and kept to the
   budget.

How it goes through the shared budget step (``common.finish``):

- ranking: forced K blocks get the score ``logit + 2*max|logit| + 1`` (over
  the row's valid blocks), so they come before every ranked block and keep
  their logit order among themselves; ranked blocks keep their logit;
- mass (``probs``): 0 for the forced K blocks and the softmax over the ranked
  blocks for the rest. Under ``tau`` the forced K blocks therefore all count
  (they add no mass) and the ranked ones are added until their mass reaches
  ``tau`` (SpargeAttn's cdf threshold), all within ``[min_blocks, kmax]``;
- a Q block below the threshold gets mass 0 everywhere, so its count is the
  most the budget allows: under ``tau`` ``kmax`` (= every valid block unless
  ``max_blocks`` is set), under ``sparsity`` ``kmax`` as for every row;
- the config's always-kept blocks (``force_sink``, ``local_window``) also get
  mass 0 and the softmax is renormalised over the other ranked blocks: they
  are added on top of the selection, as SpargeAttn's ``attention_sink`` flag
  adds block 0 after its cdf step [ours: their cdf would credit the sink's
  mass where it ranks]. Were their mass credited, the cumulative rule could
  reach ``tau`` on them alone and stop before the forced K blocks, which
  come after them in the shared budget's order.

Where we deviate:

- Budget width: SpargeAttn computes every K block that is not similar and
  every key block of a non-similar Q block, however many. Our selection has a
  static width ``kmax``, so when those forced blocks outnumber ``kmax`` a row
  keeps ``kmax`` of them, ranked first: the forced K blocks by logit, then
  (for a Q block that attends everywhere) the rest by logit. With ``tau`` and
  no ``max_blocks`` (``kmax = N``) nothing is dropped and the behaviour is
  SpargeAttn's.
- The ``tau`` count is the shared one (fewest blocks whose mass reaches
  ``tau``); their ``searchsorted(cdf, tau, right=True)`` keeps one block
  fewer in general. Their top-k fraction maps to our ``sparsity``.
- Their second stage (the per-warp online skip inside the kernel, threshold
  ``lambda``) and the Hilbert-curve token permutation for images are not
  selection-level and are left out.
- Under a causal ``config.mask`` the pairs the mask hides get ``-inf`` (never
  ranked, never forced); on the diagonal of a token-causal mask the pooled
  logit is the mean logit over the pairs the mask allows (as BA-Att's
  estimator, ``baatt.selection.estimator.diagonal_logits``), and the diagonal
  blocks are always kept by the shared budget step.
- Padding and ``key_mask``: statistics use valid tokens only; a token with
  zero norm counts as a zero unit vector (their kernel would divide by zero).
  GQA: query head ``h`` uses kv head ``h // (Hq // Hkv)``.

Parameters: ``SpargeParams`` (``BAConfig(sparge_sim_threshold=...)`` or
``BAConfig(selector_params=SpargeParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.budget import forced_blocks
from baatt.selection.common import finish, key_block_counts, mask_empty, mask_hidden, positional_space
from baatt.selection.estimator import block_stats, diagonal_logits
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SpargeParams:
    """sim_threshold: block self-similarity at or below which a block is not represented by its mean
    (``BAConfig(sparge_sim_threshold=...)``)."""

    sim_threshold: float = 0.5

    def __post_init__(self):
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise SelectorParamError(self, "sim_threshold", "must be in [-1, 1]")


def self_similarity(x: jax.Array, valid: jax.Array, block: int) -> jax.Array:
    """Mean cosine similarity over all ordered pairs of a block's valid tokens, [B, H, N].

    x [B, H, N*block, D], valid bool broadcastable to [B, H, N*block]. Empty blocks get 1.
    """
    x = x.astype(jnp.float32)
    valid = jnp.broadcast_to(valid, x.shape[:3])
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    unit = jnp.where(valid[..., None] & (norm > 0), x / jnp.where(norm > 0, norm, 1.0), 0.0)
    total = jnp.sum(layout.block_view(unit, block), axis=-2)  # [B, H, N, D]
    n = jnp.sum(layout.block_view(valid, block), axis=-1).astype(jnp.float32)
    sim = jnp.sum(total * total, axis=-1) / jnp.maximum(n * n, 1.0)
    return jnp.where(n > 0, sim, 1.0)


def block_scores(q, k, config: BAConfig, *, key_mask=None):
    """Everything the selector decides on, all [B, Hq, Nq, Nk] unless noted.

    Returns (scores, probs, logits, q_similar [B, Hq, Nq], k_similar [B, Hq, Nk]):
    ``logits`` = Qbar.Kbar/sqrt(d) (``-inf`` for empty key blocks); ``scores``
    the ranking passed to the budget (forced K blocks lifted above the rest);
    ``probs`` the mass under ``tau`` (0 for forced K blocks and for Q blocks
    that attend everywhere).
    """
    space = positional_space(q, k, config, key_mask)
    hq, hkv = space.q.shape[1], space.k.shape[1]
    hm = layout.head_map(hq, hkv)
    q_stats = block_stats(space.q, space.q_valid[:, None, :], config.block_q)
    k_stats = block_stats(space.k, space.kv_valid, config.block_k)
    threshold = config.params_for("sparge_like").sim_threshold
    q_similar = self_similarity(space.q, space.q_valid[:, None, :], config.block_q) > threshold
    k_similar = jnp.take(self_similarity(space.k, space.kv_valid, config.block_k) > threshold, hm, axis=1)
    kmean = jnp.take(k_stats.mean, hm, axis=1)
    logits = jnp.einsum("bhad,bhnd->bhan", q_stats.mean, kmean, precision=HIGHEST) / math.sqrt(q.shape[-1])
    kcount = key_block_counts(space.kv_valid, config.block_k, hq)
    logits = mask_empty(logits, kcount)
    if config.mask.kind == "causal":
        _, whole = config.mask.block_pairs(q.shape[1], k.shape[1], config.block_q, config.block_k)
        mean_logit, seen = diagonal_logits(q, k, key_mask, config)
        whole = whole | (seen >= kcount[:, :, None, :])
        logits = jnp.where(whole, logits, jnp.where(seen > 0, mean_logit, -jnp.inf))
    logits = mask_hidden(logits, q, k, config)
    valid = jnp.isfinite(logits)
    forced_k = valid & ~k_similar[:, :, None, :]
    ranked = valid & k_similar[:, :, None, :]

    spread = jnp.max(jnp.where(valid, jnp.abs(logits), 0.0), axis=-1, keepdims=True)
    scores = jnp.where(forced_k, logits + 2.0 * spread + 1.0, logits)
    ranked_logits = jnp.where(ranked, logits, -jnp.inf)
    top = jnp.max(ranked_logits, axis=-1, keepdims=True)
    e = jnp.where(ranked, jnp.exp(ranked_logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    # The config's always-kept blocks (sink, local band) are added on top, like SpargeAttn's
    # attention_sink: no mass, so the cumulative rule never stops before the forced K blocks.
    cfg_forced = forced_blocks(config, length_q=q.shape[1], length_k=k.shape[1], k_perm=None, q_heads=hq)
    if cfg_forced is not None:
        e = jnp.where(cfg_forced, 0.0, e)
    probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    probs = jnp.where(q_similar[..., None], probs, 0.0)
    return scores, probs, logits, q_similar, k_similar


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    scores, probs, *_ = block_scores(q, k, config, key_mask=key_mask)
    return finish(scores, q, k, config, probs=probs)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Softmax of the pooled logits over every valid key block."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask)[2], axis=-1)


register_selector("sparge_like", select=select, block_map=block_map, params=SpargeParams)
