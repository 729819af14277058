"""Norm sorting as the estimator runs it (docs/spec.md section 4): the fast argsort routes.

The same permutations as ``baatt.reference.norm_sort`` (the plain stable argsort of
the norms, which the tests compare this against), sorted as int32 bit patterns so
that XLA's GPU sort can hand them to CUB's radix sort, by the row route
``ROW_ARGSORT`` picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from baatt.layout import invert_permutation

# How ``norm_sort`` argsorts its rows when not told; both give the same permutation (argsort_rows).
# "flat": the norm sorts of Q and K at 128K tokens x 32 heads took 1.40 ms against 2.23 ms segmented on an
# H200 (0.50 against 0.44 ms at 32K, where XLA keeps the segmented sort for itself); bench_estimator_h200.md.
ROW_ARGSORT = "flat"
ROW_ARGSORT_METHODS = ("segmented", "flat")


def argsort_rows(keys: jax.Array, method: str | None = None) -> jax.Array:
    """Stable ascending argsort of int32 ``keys`` [..., L] along the last axis, as int32.

    ``"segmented"``: one batched sort over the rows. ``"flat"``: two stable 1-D sorts over all rows at
    once, first by key, then by row id; least-significant-key-first, so the result is ordered by (row,
    key, position), i.e. the same permutation. It exists because XLA hands 1-D sorts of (int32, index)
    pairs to CUB's radix sort whole, where the batched sort of many long rows is a segmented sort.
    """
    method = ROW_ARGSORT if method is None else method
    if method not in ROW_ARGSORT_METHODS:
        raise ValueError(f"method must be one of {ROW_ARGSORT_METHODS}; got {method!r}")
    length = keys.shape[-1]
    if method == "segmented" or keys.size >= 2**31 or keys.ndim == 1:
        return jnp.argsort(keys, axis=-1, stable=True).astype(jnp.int32)
    by_key = jnp.argsort(keys.reshape(-1), stable=True).astype(jnp.int32)  # ties: flat index = row, position
    by_row = jnp.argsort(jax.lax.div(by_key, jnp.int32(length)), stable=True)  # regroup by row, key order kept
    return jax.lax.rem(jnp.take(by_key, by_row), jnp.int32(length)).reshape(keys.shape)


def norm_sort(x: jax.Array, *, mask: jax.Array | None = None, method: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Ascending argsort of token norms over the length axis.

    Args:
      x: [B, L, H, D].
      mask: optional bool [B, L], True = real token. Masked tokens are sorted
        last (their blocks come at the end, so padding never splits a block of
        real tokens).
      method: how the rows are argsorted (``argsort_rows``; default ``ROW_ARGSORT``).

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
    perm = argsort_rows(keys, method)
    inverse = invert_permutation(perm)
    return perm, inverse
