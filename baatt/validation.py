"""Input checks shared by every public entry point: clear errors, never a silent wrong answer.

Two kinds of rule:

* structure (ranks, shapes, dtypes, configuration against the lengths) is known when a call
  is traced, so it is checked always, under ``jit``, ``vmap``, ``grad`` and ``scan`` too;
* values (NaN/Inf in the inputs, empty masks) are checked on the host only when every input of
  the computation is concrete (an eager call: no ``jax.core.Tracer`` among them, closed-over
  arrays included). Under a transform the values are unknown when the call is traced, and the
  rule is compiled into the graph instead: the affected output rows become NaN
  (:func:`nonfinite_poison`), as ``jax.nn.dot_product_attention`` propagates non-finite
  inputs, and ``debug_checks`` adds ``jax.experimental.checkify`` errors
  (:func:`debug_check_finite`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from baatt import layout
from baatt.attention_mask import BIDIRECTIONAL, AttentionMask

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def is_concrete(*values) -> bool:
    """Whether no leaf of ``values`` (pytrees; None allowed) is a tracer: their values are known now."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def check_qk(q, k, *, key_mask=None, names=("q", "k"), require_real_key: bool = True) -> None:
    """q [B, Lq, Hq, D], k [B, Lk, Hkv, D], Hkv divides Hq; key_mask bool [B, Lk].

    require_real_key: refuse, when key_mask is concrete, a batch row without any real key.
    """
    qn, kn = names
    for name, x in ((qn, q), (kn, k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, length, heads, head_dim]; got shape {getattr(x, 'shape', None)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64; got dtype {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"{name} must have no empty axis; got shape {x.shape}")
    if q.dtype != k.dtype:
        raise ValueError(f"{qn} and {kn} must share a dtype; got {q.dtype} and {k.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{qn} and {kn} must share the batch size; got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim of {qn} and {kn} must match; got {q.shape[3]} and {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"kv heads must divide query heads (GQA); got {k.shape[2]} kv heads for {q.shape[2]} query heads"
        )
    if key_mask is not None:
        if getattr(key_mask, "shape", None) != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_mask must have shape [batch, kv_length] = {(k.shape[0], k.shape[1])}; "
                             f"got {getattr(key_mask, 'shape', None)}")
        if key_mask.dtype != jnp.bool_:
            raise ValueError(f"key_mask must be a bool array (True = real token); got dtype {key_mask.dtype}")
        if require_real_key and is_concrete(key_mask) and not np.all(np.asarray(key_mask).any(axis=1)):
            raise ValueError("key_mask must keep at least one real key in every batch row")


def check_qkv(q, k, v, *, key_mask=None, require_real_key: bool = True) -> None:
    check_qk(q, k, key_mask=key_mask, require_real_key=require_real_key)
    if getattr(v, "ndim", None) != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [batch, kv_length, kv_heads, head_dim_v] matching k {k.shape[:3]}; got {getattr(v, 'shape', None)}")
    if v.dtype != k.dtype:
        raise ValueError(f"v must share the dtype of k ({k.dtype}); got {v.dtype}")


def _nonfinite_tokens(name: str, x, key_mask):
    """bool [B, L, H]: tokens of ``x`` holding NaN/Inf; for keys and values only the real ones (key_mask)."""
    bad = ~jnp.all(jnp.isfinite(x), axis=-1)
    if name != "q" and key_mask is not None:
        bad = bad & key_mask[:, :, None]
    return bad


def _where_text(name: str) -> str:
    return ("query row {row} (batch {batch}, head {head})" if name == "q"
            else "real key {row} (batch {batch}, kv head {head})")


def check_finite(*, key_mask=None, **arrays) -> None:
    """Refuse NaN/Inf in attention inputs, on the host, when all of them are concrete.

    ``q`` is checked everywhere (every query row is real); ``k`` and ``v`` only at
    real keys (``key_mask``), since padding is never read and may hold anything. When
    any of them is a tracer nothing is checked here: the graph carries the rule
    (:func:`nonfinite_poison`).
    """
    if not is_concrete(key_mask, *arrays.values()):
        return
    for name, x in arrays.items():
        if x is None:
            continue
        bad = np.asarray(_nonfinite_tokens(name, x, key_mask))
        if bad.any():
            batch, row, head = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} contains NaN or Inf at {_where_text(name).format(row=row, batch=batch, head=head)}; "
                             "attention inputs must be finite")


def debug_check_finite(q, k, v, key_mask=None) -> None:
    """The rule of :func:`check_finite` as ``jax.experimental.checkify`` checks, for traced inputs.

    Under ``jit`` and the other transforms the caller wraps its function in
    ``checkify.checkify`` and gets the error (with the first offending row) back as a value.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        bad = _nonfinite_tokens(name, x, key_mask)
        batch, row, head = jnp.unravel_index(jnp.argmax(bad), bad.shape)
        checkify.check(~jnp.any(bad), f"{name} contains NaN or Inf at {_where_text(name)}; attention inputs must "
                       "be finite", row=row, batch=batch, head=head)


def check_scale(scale, head_dim: int):
    """(static scale, traced scale or None) for ``attention(scale=...)``.

    None gives ``1/sqrt(head_dim)``. A concrete value must be a finite positive number and
    is returned as a Python float (the kernels compile it in). A traced value cannot be
    checked now: it comes back as the second element, static scale 1.0, and the
    pipeline scales q by it and makes the output NaN where it is not finite and positive.
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim), None
    if isinstance(scale, jax.core.Tracer):
        if scale.shape != ():
            raise ValueError(f"scale must be a scalar; got shape {scale.shape}")
        return 1.0, scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a finite positive number; got {scale!r}") from None
    if isinstance(scale, bool) or not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"scale must be a finite positive number; got {scale!r}")
    return value, None


def check_sink_positions(config, length_k: int) -> None:
    """With ``force_sink``, every sink position must name a key: refuse positions >= the key length."""
    if config.force_sink and max(config.sink_positions) >= length_k:
        raise ValueError(f"BAConfig.sink_positions must lie below the key length {length_k} when force_sink is "
                         f"on (each names a key whose block is always kept); got {config.sink_positions}")


def nan_where(bad: jax.Array) -> jax.Array:
    """float32: NaN where ``bad``, else 0 (added to an output, it poisons exactly the rows it must)."""
    return jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(0.0))


def _first_bad_key(bad: jax.Array) -> jax.Array:
    """Position of the first True along axis 1 of ``bad`` [B, Lk, ...]: [B, ...] int32, Lk where there is none."""
    positions = jnp.arange(bad.shape[1], dtype=jnp.int32).reshape((1, -1) + (1,) * (bad.ndim - 2))
    return jnp.min(jnp.where(bad, positions, bad.shape[1]), axis=1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def nonfinite_poison(q, k, v, key_mask=None, mask: AttentionMask = BIDIRECTIONAL) -> tuple[jax.Array, jax.Array]:
    """(rows [B, Lq, Hq], columns [B, 1, Hq, Dv]), float32: NaN where NaN/Inf inputs reach the output, else 0.

    The rule of ``jax.nn.dot_product_attention``, whatever blocks a selection keeps:
    NaN/Inf in a query row poisons its own output row; in k at a real key
    (``key_mask`` True) it poisons the rows of the query heads served by that kv head
    that see the key under ``mask`` (all of them when bidirectional); in v at a real
    key it poisons the output dims where v holds it in every row of those heads (in
    ``jax.nn`` a key a row may not see still gets weight exactly 0, and 0 * NaN is NaN).
    Padding is never read. The output gets ``rows[..., None] + columns`` added and
    its log-sum-exp ``rows``; that costs one read of q, k and v. The derivative is
    NaN where the value is (see the JVP below), so that gradients carry the NaN too,
    as through ``jax.nn``.
    """
    _, length_q, q_heads, _ = q.shape
    length_k = k.shape[1]
    head_map = layout.head_map(q_heads, k.shape[2])
    v_bad = ~jnp.isfinite(v)
    if key_mask is not None:
        v_bad = v_bad & key_mask[:, :, None, None]
    # First poisoned key of each kv head, for each query head: row i sees it when it lies below i's key limit.
    first_k = jnp.take(_first_bad_key(_nonfinite_tokens("k", k, key_mask)), head_map, axis=1)[:, None]  # [B, 1, Hq]
    if mask.is_bidirectional:
        limit = length_k
    else:
        limit = jnp.minimum(mask.key_limit(jnp.arange(length_q, dtype=jnp.int32)), length_k)[None, :, None]
    rows = _nonfinite_tokens("q", q, None) | (first_k < limit)
    columns = jnp.take(jnp.any(v_bad, axis=1), head_map, axis=1)[:, None]  # [B, 1, Hq, Dv]
    return nan_where(rows), nan_where(columns)


@nonfinite_poison.defjvp
def _nonfinite_poison_jvp(mask, primals, tangents):
    # Linear in the tangents and scaled by the poison (0 or NaN): on clean rows and columns the derivative is
    # 0; a poisoned row passes NaN to the cotangent of its whole q row and of its kv head's real keys, a
    # poisoned column to its dim of v at the real keys.
    q, k, v, key_mask = primals
    dq, dk, dv = tangents[:3]
    rows, columns = nonfinite_poison(q, k, v, key_mask, mask)
    head_map = layout.head_map(q.shape[2], k.shape[2])
    per_key = jnp.sum(dk, axis=-1, dtype=jnp.float32)  # [B, Lk, Hkv]
    dv = dv.astype(jnp.float32)
    if key_mask is not None:
        per_key = jnp.where(key_mask[:, :, None], per_key, 0.0)
        dv = jnp.where(key_mask[:, :, None, None], dv, 0.0)
    per_head = jnp.take(jnp.sum(per_key, axis=1), head_map, axis=1)  # [B, Hq]
    d_rows = rows * (jnp.sum(dq, axis=-1, dtype=jnp.float32) + per_head[:, None, :])
    d_columns = columns * jnp.take(jnp.sum(dv, axis=1), head_map, axis=1)[:, None]
    return (rows, columns), (d_rows, d_columns)
