"""Differentiable entry points of the Mosaic GPU kernels: the custom VJPs and the jitted functions.

``block_sparse_attention`` works in block space (``baatt.layout.BlockSpace``)
and sanitises masked keys first (``baatt.kernels.common.sanitize_masked_keys``:
masked K/V rows zeroed with ``where``, so NaN/Inf stored there cannot leak, and a
``-inf`` key bias); ``all_valid=True`` skips that and compiles the kernels
without the bias. ``positional_attention`` reads and writes the caller's
[B, L, H, D] arrays. The backward runs the Mosaic GPU dq and dk/dv kernels, or
the portable Pallas backward (``backward_impl="pallas"``, or block_k 64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from baatt.attention_mask import BIDIRECTIONAL, AttentionMask
from baatt.kernels import pallas_triton
from baatt.kernels.common import pack_selection, sanitize_masked_keys
from baatt.kernels.mosaic_gpu.backward_kernels import backward
from baatt.kernels.mosaic_gpu.config import (
    BACKWARD_IMPLS,
    DEFAULT_BWD_TUNING,
    DEFAULT_TUNING,
    SUPPORTED_BWD_BLOCK_K,
    BwdTuning,
    Tuning,
    unsupported_reason,
)
from baatt.kernels.mosaic_gpu.forward_kernel import forward
from baatt.kernels.pallas_triton.block_sparse import first_order_only


def _run_backward(q, k, v, bias, indices, counts, out, lse, do, dlse, *, scale, block_q, block_k, backward_impl,
                  bwd_tuning=DEFAULT_BWD_TUNING, span=None):
    """Block-space gradients: the Mosaic GPU kernels, or the portable Pallas ones (block_k 64, or asked)."""
    if backward_impl == "mosaic_gpu" and block_k in SUPPORTED_BWD_BLOCK_K:
        return backward(q, k, v, bias, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                        block_k=block_k, tuning=bwd_tuning, span=span)
    if bias is None:
        bias = jnp.zeros(k.shape[:3], jnp.float32)
    t = pallas_triton.DEFAULT_TUNING.resolve(block_q, block_k, q.shape[-1])
    return pallas_triton.backward(q, k, v, bias, indices, counts, out, lse, do, dlse, scale=scale,
                                  block_q=block_q, block_k=block_k, tuning=t, interpret=False, span=span)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12, 13, 14))
def _attend(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret, backward_impl,
            bwd_tuning, span):
    return _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret,
                       backward_impl, bwd_tuning, span)[0]


def _attend_fwd(q, k, v, kv_valid, indices, counts, scale, block_q, block_k, tuning, all_valid, interpret,
                backward_impl, bwd_tuning, span):
    q, k, v = first_order_only("mosaic_gpu", q, k, v)
    if all_valid:
        kc, vc, bias = k, v, None
    else:
        kc, vc, bias = sanitize_masked_keys(kv_valid, k, v)
    out, lse = forward(q, kc, vc, pack_selection(indices, counts), bias, scale=scale, block_q=block_q,
                       block_k=block_k, tuning=tuning, span=span, interpret=interpret)
    return (out, lse), (q, kc, vc, bias, indices, counts, out, lse)


def _attend_bwd(scale, block_q, block_k, tuning, all_valid, interpret, backward_impl, bwd_tuning, span, res, cts):
    # Gradients w.r.t. the sanitised K/V are exactly those w.r.t. K/V: masked rows get p = 0, so 0.
    res, cts = first_order_only("mosaic_gpu", res, cts)
    q, kc, vc, bias, indices, counts, out, lse = res
    do, dlse = cts
    dq, dk, dv = _run_backward(q, kc, vc, bias, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                               block_k=block_k, backward_impl=backward_impl, bwd_tuning=bwd_tuning, span=span)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# Positional layout: no permutation, no key mask, lengths whole blocks (a causal mask applies as is). The forward reads and writes
# the caller's [B, L, H, D] arrays directly (saves four transposes of Q/K/V/out, docs/spec.md section 7),
# and so does the Mosaic GPU backward; the portable fallback transposes into block space.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _attend_positional(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl, bwd_tuning, span):
    return _attend_positional_fwd(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl,
                                  bwd_tuning, span)[0]


def _attend_positional_fwd(q, k, v, indices, counts, scale, block_q, block_k, tuning, backward_impl, bwd_tuning,
                           span):
    q, k, v = first_order_only("mosaic_gpu", q, k, v)
    out, lse = forward(q, k, v, pack_selection(indices, counts), None, scale=scale, block_q=block_q,
                       block_k=block_k, tuning=tuning, positional=True, span=span)
    return (out, lse), (q, k, v, indices, counts, out, lse)


def _attend_positional_bwd(scale, block_q, block_k, tuning, backward_impl, bwd_tuning, span, res, cts):
    res, cts = first_order_only("mosaic_gpu", res, cts)
    q, k, v, indices, counts, out, lse = res
    do, dlse = cts
    if backward_impl == "mosaic_gpu" and block_k in SUPPORTED_BWD_BLOCK_K:
        # The kernels read and write [B, L, H, D] directly: no transposes.
        dq, dk, dv = backward(q, k, v, None, indices, counts, out, lse, do, dlse, scale=scale, block_q=block_q,
                              block_k=block_k, tuning=bwd_tuning, positional=True, span=span)
        return dq, dk, dv, None, None
    hm = lambda x: jnp.swapaxes(x, 1, 2)
    dq, dk, dv = _run_backward(hm(q), hm(k), hm(v), None, indices, counts, hm(out), lse, hm(do), dlse, scale=scale,
                               block_q=block_q, block_k=block_k, backward_impl=backward_impl, bwd_tuning=bwd_tuning,
                               span=span)
    return hm(dq), hm(dk), hm(dv), None, None


_attend_positional.defvjp(_attend_positional_fwd, _attend_positional_bwd)


def _check_arguments(q, k, v, block_q, block_k, backward_impl, mask):
    if reason := unsupported_reason(q.shape, k.shape, v.shape, q.dtype, block_q, block_k):
        raise ValueError(reason)
    if backward_impl not in BACKWARD_IMPLS:
        raise ValueError(f"backward_impl must be one of {BACKWARD_IMPLS}; got {backward_impl!r}")
    if not isinstance(mask, AttentionMask):
        raise ValueError(f"mask must be a baatt.AttentionMask; got {type(mask).__name__}")
    if rule := mask.block_size_rule(block_q, block_k):
        raise ValueError(rule)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "backward_impl",
                                             "backward_tuning", "mask"))
def positional_attention(q, k, v, indices, counts, *, scale: float, block_q: int, block_k: int,
                         tuning: Tuning = DEFAULT_TUNING, backward_impl: str = "mosaic_gpu",
                         backward_tuning: BwdTuning = DEFAULT_BWD_TUNING, mask: AttentionMask = BIDIRECTIONAL):
    """Block-sparse attention on [B, L, H, D] inputs with an unpermuted selection and every key valid.

    q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] with Lq % block_q == 0 == Lk % block_k; returns out
    [B, Lq, Hq, D] and lse [B, Hq, Lq] (natural log). Differentiable in q, k, v; backward_impl
    "mosaic_gpu" (block_k 128/256; 64 uses the portable kernels) or "pallas". mask (static): a causal
    or block-causal mask on the rows' and keys' positions; the selection should keep only blocks it allows.
    """
    _check_arguments(q, k, v, block_q, block_k, backward_impl, mask)
    if q.shape[1] % block_q or k.shape[1] % block_k:
        raise ValueError(f"positional_attention needs whole blocks: lengths {q.shape[1]}, {k.shape[1]} with "
                         f"block_q={block_q}, block_k={block_k}")
    return _attend_positional(q, k, v, indices.astype(jnp.int32), counts.astype(jnp.int32), float(scale),
                              block_q, block_k, tuning, backward_impl, backward_tuning, mask.span)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "tuning", "all_valid", "interpret",
                                             "backward_impl", "backward_tuning", "mask"))
def block_sparse_attention(q, k, v, kv_valid, indices, counts, *, scale: float, block_q: int, block_k: int,
                           tuning: Tuning = DEFAULT_TUNING, all_valid: bool = False, interpret: bool = False,
                           backward_impl: str = "mosaic_gpu", backward_tuning: BwdTuning = DEFAULT_BWD_TUNING,
                           mask: AttentionMask = BIDIRECTIONAL):
    """Block-sparse attention in block space on Hopper; differentiable in q, k, v.

    Same contract as ``baatt.kernels.pallas_triton.block_sparse_attention``, ``mask`` included (static;
    rows and keys at their positions); ``all_valid=True`` promises that ``kv_valid`` is all True (no key
    mask, no padding) and compiles the kernels without the key bias.
    """
    _check_arguments(q, k, v, block_q, block_k, backward_impl, mask)
    return _attend(q, k, v, kv_valid, indices.astype(jnp.int32), counts.astype(jnp.int32), float(scale),
                   block_q, block_k, tuning, bool(all_valid), interpret, backward_impl, backward_tuning, mask.span)
