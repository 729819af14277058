"""Norm sorting (docs/spec.md section 4): per (batch, head) permutations and their inverses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from baatt.layout import invert_permutation


def norm_sort(x: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Ascending stable argsort of token norms over the length axis.

    Args:
      x: [B, L, H, D].
      mask: optional bool [B, L], True = real token. Masked tokens are sorted
        last (their blocks come at the end, so padding never splits a block of
        real tokens).

    Returns:
      perm, inverse: int32 [B, H, L]; ``x_sorted[b, h] = x[b, perm[b, h], h]``
      and ``inverse[b, h, perm[b, h, i]] = i``. Equal norms (and all padding)
      keep their positional order.
    """
    norms = jnp.swapaxes(jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 1, 2)  # [B, H, L]
    if mask is not None:
        norms = jnp.where(mask[:, None, :], norms, jnp.inf)
    perm = jnp.argsort(norms, axis=-1, stable=True).astype(jnp.int32)
    return perm, invert_permutation(perm)


__all__ = ["invert_permutation", "norm_sort"]
