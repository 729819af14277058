"""Norm sorting (SPEC.md section 4): per (batch, head) permutations and inverses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from baatt.layout import invert_permutation


def norm_sort(x: jax.Array, *, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Ascending argsort of token norms over the length axis.

    Args:
      x: [B, L, H, D].
      mask: optional bool [B, L], True = real token. Masked tokens are sorted
        last (their blocks come at the end, so padding never splits a block of
        real tokens).

    Returns:
      perm, inverse: int32 [B, H, L]; ``x_sorted[b, h] = x[b, perm[b, h], h]``
      and ``inverse[b, h, perm[b, h, i]] = i``.
    """
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)  # [B, L, H]
    norms = jnp.swapaxes(norms, 1, 2)  # [B, H, L]
    if mask is not None:
        norms = jnp.where(mask[:, None, :], norms, jnp.inf)
    # A stable sort keeps equal norms (and all padding) in positional order. Sorted as int32 bit
    # patterns, which order non-negative floats (and +inf after them) exactly as their values: XLA's
    # GPU sort rewriter sends a (keys, indices) pair sort to CUB's radix sort only with a plain
    # comparator, and JAX's float comparator (numpy order) only when a single array is sorted.
    keys = jax.lax.bitcast_convert_type(norms, jnp.int32)
    perm = jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)
    inverse = invert_permutation(perm)
    return perm, inverse
