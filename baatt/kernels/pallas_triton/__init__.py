"""Portable Pallas (Triton lowering) block-sparse attention; registers ``implementation="pallas"``.

The kernel (``block_sparse.py``) runs on CUDA GPUs through the Pallas Triton
lowering, and anywhere in Pallas interpret mode (``interpret=True``, e.g. CPU
tests). Supported: head dim 64 or 128 (q, k, v equal), bfloat16 / float16 /
float32, block sizes powers of two in [16, 256], GQA.

Beside it: ``oracle.py`` (the streamed oracle map ``M_hat``) and ``topk.py``
(the fixed-budget block selection in one read of the scores, used by
``baatt.selection.budget.select_from_scores`` when asked or enabled).
"""

from __future__ import annotations

import jax

from baatt.api import Implementation, register_implementation
from baatt.kernels.pallas_triton.block_sparse import (
    DEFAULT_TUNING,
    Tuning,
    block_sparse_attention,
    transpose_selection,
    unsupported_reason,
)


def _has_cuda_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def unavailable(q, k, v, config, interpret) -> str | None:
    if not interpret and not _has_cuda_gpu():
        return "no CUDA GPU found; pass interpret=True to run the Pallas kernel in interpret mode (slow, for tests)"
    return unsupported_reason(q.shape, k.shape, v.shape, q.dtype, config.block_q, config.block_k)


def sparse(space, indices, counts, *, scale, interpret=False):
    return block_sparse_attention(
        space.q, space.k, space.v, space.kv_valid, indices, counts,
        scale=float(scale), block_q=space.block_q, block_k=space.block_k, interpret=interpret,
    )


register_implementation(Implementation(name="pallas", priority=10, unavailable=unavailable, sparse=sparse))

__all__ = [
    "DEFAULT_TUNING",
    "Tuning",
    "block_sparse_attention",
    "sparse",
    "transpose_selection",
    "unavailable",
    "unsupported_reason",
]
