"""Portable Pallas (Triton lowering) kernels; ``IMPLEMENTATION`` is the ``implementation="pallas"`` backend.

``block_sparse.py``: block-sparse attention, forward and backward, on CUDA GPUs
through the Pallas Triton lowering and anywhere in Pallas interpret mode
(``interpret=True``, e.g. CPU tests). Supported: head dim 64 or 128 (q, k, v
equal), bfloat16 / float16 / float32, block sizes powers of two in [16, 256], GQA,
bidirectional, causal and block-causal masks.

Beside it: ``oracle.py`` (the streamed oracle map ``M_hat``), ``topk.py``
(the fixed-budget block selection in one read of the scores, used by
``baatt.selection.budget.select_from_scores`` when asked or enabled) and
``row_block_lse.py`` (per-row block log-sum-exp of a few query rows against every
key: the ``pooled_query`` selector on a GPU).
"""

from __future__ import annotations

from baatt import platform
from baatt.kernels.base import Implementation
from baatt.kernels.common import join_reasons
from baatt.kernels.pallas_triton.block_sparse import (
    DEFAULT_TUNING,
    Tuning,
    backward,
    block_sparse_attention,
    unsupported_reason,
)


def why_unavailable(q, k, v, config, interpret) -> str | None:
    """Every reason the kernel cannot run these inputs here, joined with "; ", or None."""
    no_gpu = None
    if not interpret and not platform.has_gpu():
        no_gpu = "no CUDA GPU found; pass interpret=True to run the Pallas kernel in interpret mode (slow, for tests)"
    return join_reasons(no_gpu, unsupported_reason(q.shape, k.shape, v.shape, q.dtype, config.block_q,
                                                   config.block_k))


def sparse_op(space, indices, counts, *, scale, interpret=False):
    """``Implementation.sparse_op``: the kernel on a ``baatt.layout.BlockSpace``."""
    return block_sparse_attention(
        space.q, space.k, space.v, space.kv_valid, indices, counts,
        scale=float(scale), block_q=space.block_q, block_k=space.block_k, interpret=interpret, mask=space.mask,
    )


IMPLEMENTATION = Implementation(
    name="pallas",
    priority=10,
    why_unavailable=why_unavailable,
    sparse_op=sparse_op,
    reference="baatt.reference.attention.block_sparse_blocked",
)

__all__ = [
    "DEFAULT_TUNING",
    "IMPLEMENTATION",
    "Tuning",
    "backward",
    "block_sparse_attention",
    "sparse_op",
    "unsupported_reason",
    "why_unavailable",
]
