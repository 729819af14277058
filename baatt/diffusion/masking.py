"""Masked-diffusion forward process and loss (LLaDA).

Forward process: per sequence draw ``t ~ U(eps, 1]`` and replace each eligible
token by the mask token with probability ``t``. Loss: cross-entropy of the
clean token at every masked position, weighted by ``1/t`` (an upper bound on
the negative log-likelihood), normalised by the number of eligible tokens of
the sequence, averaged over the batch. ``eligible`` restricts masking to a
region (e.g. the answer span of a task example, as in LLaDA's SFT where the
prompt is never masked); by default every token is eligible.

The output head (d -> vocab at every position) dominates the cost of a small
model with a large vocabulary, yet the loss only reads masked positions.
:func:`diffusion_loss_gathered` applies the head at ``head_positions`` = K
gathered positions per row (masked ones first, a uniform random subset of K
when a row has more), reweighted to an unbiased estimate of
:func:`diffusion_loss`; with K >= every row's masked count it equals it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def forward_process(key, tokens, *, mask_id: int, eligible=None, eps: float = 1e-3, t=None, full_rows=None,
                    full_rows_t_min: float = 1.0):
    """Returns (noisy tokens, masked bool [B, L], t [B]).

    full_rows: optional bool [B]; those rows use t = 1 (every eligible token masked), or with
    ``full_rows_t_min`` < 1 a t ~ U(full_rows_t_min, 1] of their own (e.g. a task answer masked
    in part, as the sampler sees it after committing some of its tokens; the 1/t weight stays
    at most 1/full_rows_t_min).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1); got {eps}")
    if not 0.0 < full_rows_t_min <= 1.0:
        raise ValueError(f"full_rows_t_min must lie in (0, 1]; got {full_rows_t_min}")
    b, l = tokens.shape
    kt, km = jax.random.split(key)
    if t is None:
        # U(eps, 1], stratified over the batch (low-discrepancy, as in MDLM): row i draws
        # from the i-th of B equal strata of a random offset; each row is still U(eps, 1].
        u = jnp.mod(jax.random.uniform(kt, ()) + jnp.arange(b) / b, 1.0)
        u = jax.random.permutation(jax.random.fold_in(kt, 1), u)
        t = eps + (1.0 - eps) * (1.0 - u)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if full_rows is not None:
        t_rows = 1.0 - (1.0 - full_rows_t_min) * jax.random.uniform(jax.random.fold_in(kt, 3), (b,))
        t = jnp.where(full_rows, t_rows, t)
    masked = jax.random.uniform(km, (b, l)) < t[:, None]
    if eligible is not None:
        masked = masked & eligible
    noisy = jnp.where(masked, mask_id, tokens)
    return noisy, masked, t


def masked_ce(logits, tokens, masked):
    """Per-token cross-entropy [B, L] in float32, zero where not masked."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    return jnp.where(masked, ce, 0.0)


def diffusion_loss(logits_fn, key, tokens, *, mask_id: int, eligible=None, eps: float = 1e-3, full_rows=None,
                   full_rows_t_min: float = 1.0):
    """Masked-diffusion loss of ``logits_fn(noisy_tokens) -> logits``; returns (loss, metrics).

    full_rows: bool [B] rows masked completely (t = 1) over their eligible tokens,
    e.g. task answers: the 1/t weight of a random t on a 2-token answer span has
    a huge variance (one masked token at t = 0.01 weighs 50x), which stalls training.
    """
    noisy, masked, t = forward_process(key, tokens, mask_id=mask_id, eligible=eligible, eps=eps, full_rows=full_rows,
                                       full_rows_t_min=full_rows_t_min)
    logits = logits_fn(noisy)
    ce = masked_ce(logits, tokens, masked)
    correct = jnp.argmax(logits, -1) == tokens
    return _loss_and_metrics(ce, correct, masked.astype(jnp.float32), masked, t, tokens, eligible)


def _loss_and_metrics(ce, correct, weight, masked, t, tokens, eligible):
    """Loss and metrics from per-token ce / correct [B, N] with weights [B, N] (zero at unused tokens).

    ``sum(weight * x)`` estimates (or equals) the sum of x over the masked tokens of the row.
    """
    n_elig = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.float32) if eligible is None else jnp.sum(eligible, -1)
    wce = jnp.where(weight > 0, ce * weight, 0.0)
    per_seq = jnp.sum(wce, axis=-1) / t / jnp.maximum(n_elig, 1.0)
    n_masked = jnp.sum(masked)
    metrics = dict(
        loss=jnp.mean(per_seq),
        masked_ce=jnp.sum(wce) / jnp.maximum(n_masked, 1),
        masked_acc=jnp.sum(jnp.where(correct, weight, 0.0)) / jnp.maximum(n_masked, 1),
        masked_frac=n_masked / tokens.size,
    )
    return jnp.mean(per_seq), metrics


def head_positions_for(length: int, head_positions) -> int | None:
    """Number of gathered positions per row for a row of ``length`` tokens.

    head_positions: None (every position: no gathering), an int K >= 1 (clipped
    to ``length``), or a float in (0, 1]: that fraction of ``length``, rounded up.
    """
    if head_positions is None:
        return None
    if isinstance(head_positions, bool) or not isinstance(head_positions, (int, float)):
        raise ValueError(f"head_positions must be None, an int >= 1 or a float in (0, 1]; got {head_positions!r}")
    if isinstance(head_positions, float):
        if not 0.0 < head_positions <= 1.0:
            raise ValueError(f"head_positions as a fraction must lie in (0, 1]; got {head_positions}")
        return max(1, min(length, math.ceil(head_positions * length)))
    if head_positions < 1:
        raise ValueError(f"head_positions must be >= 1; got {head_positions}")
    return min(length, head_positions)


def select_head_positions(key, masked, k: int):
    """Per row, K positions with the masked ones first (random order among them).

    Returns (idx int32 [B, K], weight float32 [B, K]): weight is n_masked / n_kept
    of the row at kept masked positions and 0 elsewhere, so that for any per-token
    x, ``sum(weight * x[idx])`` is an unbiased estimate of the row's sum of x over
    masked tokens (exact when n_masked <= K: then every masked token is kept).
    A row with more than K masked tokens keeps a uniform random subset of K.
    """
    b, l = masked.shape
    if not 1 <= k <= l:
        raise ValueError(f"k must lie in [1, {l}]; got {k}")
    # masked positions score in [1, 2], the others in [0, 1): top-k takes masked ones first, at random among them
    score = masked.astype(jnp.float32) + jax.random.uniform(key, (b, l), jnp.float32)
    _, idx = jax.lax.top_k(score, k)
    kept = jnp.take_along_axis(masked, idx, axis=-1)
    n_masked = jnp.sum(masked, -1, keepdims=True).astype(jnp.float32)
    n_kept = jnp.sum(kept, -1, keepdims=True).astype(jnp.float32)
    weight = jnp.where(kept, n_masked / jnp.maximum(n_kept, 1.0), 0.0)
    return idx.astype(jnp.int32), weight


def diffusion_loss_gathered(hidden_fn, head_fn, key, tokens, *, mask_id: int, head_positions, eligible=None,
                            eps: float = 1e-3, full_rows=None, full_rows_t_min: float = 1.0):
    """:func:`diffusion_loss` with the output head applied at K gathered positions per row only.

    hidden_fn(noisy_tokens) -> hidden states [B, L, d]; head_fn(h [..., d]) -> logits [..., vocab].
    head_positions: K per row (see :func:`head_positions_for`; None = every position). Each row
    keeps its masked positions first, a uniform random subset of K when it has more, and each kept
    token is weighted by n_masked / n_kept of its row: the loss and the masked_ce / masked_acc
    metrics are unbiased estimates of those of :func:`diffusion_loss` with the same key, and equal
    them (up to float rounding) when K >= every row's number of masked tokens. Same masks as
    :func:`diffusion_loss` for the same key (the subset uses a key folded from it).
    """
    k = head_positions_for(tokens.shape[1], head_positions)
    if k is None:
        return diffusion_loss(lambda x: head_fn(hidden_fn(x)), key, tokens, mask_id=mask_id, eligible=eligible,
                              eps=eps, full_rows=full_rows, full_rows_t_min=full_rows_t_min)
    noisy, masked, t = forward_process(key, tokens, mask_id=mask_id, eligible=eligible, eps=eps, full_rows=full_rows,
                                       full_rows_t_min=full_rows_t_min)
    h = hidden_fn(noisy)
    idx, weight = select_head_positions(jax.random.fold_in(key, 2), masked, k)
    # gathered in float32 so that the backward scatter adds in float32 (see baatt.nn.model.embed_tokens); same values
    hk = jnp.take_along_axis(h.astype(jnp.float32), idx[:, :, None], axis=1).astype(h.dtype)  # [B, K, d]
    logits = head_fn(hk)  # [B, K, vocab]
    tok_k = jnp.take_along_axis(tokens, idx, axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tok_k)
    correct = jnp.argmax(logits, -1) == tok_k
    loss, metrics = _loss_and_metrics(ce, correct, weight, masked, t, tokens, eligible)
    metrics["head_frac"] = jnp.sum(weight > 0) / jnp.maximum(jnp.sum(masked), 1)  # share of masked tokens kept
    return loss, metrics
