"""Masked-diffusion forward process and loss (LLaDA).

Forward process: per sequence draw ``t ~ U(eps, 1]`` and replace each eligible
token by the mask token with probability ``t``. Loss: cross-entropy of the
clean token at every masked position, weighted by ``1/t`` (an upper bound on
the negative log-likelihood), normalised by the number of eligible tokens of
the sequence, averaged over the batch. ``eligible`` restricts masking to a
region (e.g. the answer span of a task example, as in LLaDA's SFT where the
prompt is never masked); by default every token is eligible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def forward_process(key, tokens, *, mask_id: int, eligible=None, eps: float = 1e-3, t=None, full_rows=None):
    """Returns (noisy tokens, masked bool [B, L], t [B]).

    full_rows: optional bool [B]; those rows use t = 1 (every eligible token masked).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1); got {eps}")
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
        t = jnp.where(full_rows, 1.0, t)
    masked = jax.random.uniform(km, (b, l)) < t[:, None]
    if eligible is not None:
        masked = masked & eligible
    noisy = jnp.where(masked, mask_id, tokens)
    return noisy, masked, t


def masked_ce(logits, tokens, masked):
    """Per-token cross-entropy [B, L] in float32, zero where not masked."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    return jnp.where(masked, ce, 0.0)


def diffusion_loss(logits_fn, key, tokens, *, mask_id: int, eligible=None, eps: float = 1e-3, full_rows=None):
    """Masked-diffusion loss of ``logits_fn(noisy_tokens) -> logits``; returns (loss, metrics).

    full_rows: bool [B] rows masked completely (t = 1) over their eligible tokens,
    e.g. task answers: the 1/t weight of a random t on a 2-token answer span has
    a huge variance (one masked token at t = 0.01 weighs 50x), which stalls training.
    """
    noisy, masked, t = forward_process(key, tokens, mask_id=mask_id, eligible=eligible, eps=eps, full_rows=full_rows)
    logits = logits_fn(noisy)
    ce = masked_ce(logits, tokens, masked)
    n_elig = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.float32) if eligible is None else jnp.sum(eligible, -1)
    per_seq = jnp.sum(ce, axis=-1) / t / jnp.maximum(n_elig, 1.0)
    n_masked = jnp.sum(masked)
    metrics = dict(
        loss=jnp.mean(per_seq),
        masked_ce=jnp.sum(ce) / jnp.maximum(n_masked, 1),
        masked_acc=jnp.sum((jnp.argmax(logits, -1) == tokens) & masked) / jnp.maximum(n_masked, 1),
        masked_frac=n_masked / tokens.size,
    )
    return jnp.mean(per_seq), metrics
