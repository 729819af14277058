"""Input checks shared by every public entry point: clear errors, never a wrong answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_qk(q, k, *, key_mask=None, names=("q", "k")) -> None:
    """q [B, Lq, Hq, D], k [B, Lk, Hkv, D], Hkv divides Hq; key_mask bool [B, Lk]."""
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
        if key_mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_mask must have shape [batch, kv_length] = {(k.shape[0], k.shape[1])}; got {key_mask.shape}")
        if key_mask.dtype != jnp.bool_:
            raise ValueError(f"key_mask must be a bool array (True = real token); got dtype {key_mask.dtype}")
        if _is_concrete(key_mask) and not np.all(np.asarray(key_mask).any(axis=1)):
            raise ValueError("key_mask must keep at least one real key in every batch row")


def check_qkv(q, k, v, *, key_mask=None) -> None:
    check_qk(q, k, key_mask=key_mask)
    if getattr(v, "ndim", None) != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [batch, kv_length, kv_heads, head_dim_v] matching k {k.shape[:3]}; got {getattr(v, 'shape', None)}")
    if v.dtype != k.dtype:
        raise ValueError(f"v must share the dtype of k ({k.dtype}); got {v.dtype}")


def check_finite(*, key_mask=None, **arrays) -> None:
    """Non-finite inputs would silently corrupt scores, sorting and outputs: refuse them when concrete.

    ``q`` is checked everywhere; ``k`` and ``v`` only at real keys (``key_mask``),
    since padding is never read and may hold anything.
    """
    for name, x in arrays.items():
        if x is None or not _is_concrete(x) or (key_mask is not None and not _is_concrete(key_mask)):
            continue
        finite = jnp.isfinite(x)
        if name != "q" and key_mask is not None:
            finite = finite | ~key_mask[:, :, None, None]
        if not bool(jnp.all(finite)):
            raise ValueError(f"{name} contains NaN or Inf at real tokens; attention inputs must be finite")
