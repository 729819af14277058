"""Hopper (sm90) block-sparse attention in Pallas Mosaic GPU; ``IMPLEMENTATION`` is the ``"mosaic_gpu"`` backend.

Files:

* ``config.py``: CTA shape, ``Tuning`` / ``BwdTuning`` and their defaults, the supported inputs;
* ``_pipeline.py``: the warp-specialised pipeline the three kernels share (producer warpgroup
  streaming tiles by TMA, two wgmma consumer warpgroups);
* ``forward_kernel.py``: the forward, one CTA per query tile or, on short walks, persistent;
* ``backward_kernels.py``: the dq and dk/dv kernels;
* ``attention.py``: the custom VJPs and the jitted entry points.

Picked first by ``implementation=None`` on a GPU of compute capability 9.x for
bf16/f16 inputs, head dim 64 or 128, block_q 128 or 256 and block_k 64, 128 or
256, under a bidirectional, causal or block-causal mask; anything else falls
back to the next implementation, and asking for it explicitly raises with the
reasons.
"""

from __future__ import annotations

from baatt import platform
from baatt.kernels.base import Implementation
from baatt.kernels.common import join_reasons, pack_selection
from baatt.kernels.mosaic_gpu.attention import block_sparse_attention, positional_attention
from baatt.kernels.mosaic_gpu.backward_kernels import backward
from baatt.kernels.mosaic_gpu.config import (
    DEFAULT_BWD_TUNING,
    DEFAULT_TUNING,
    PERSISTENT_MAX_STEPS,
    BwdTuning,
    Tuning,
    unsupported_reason,
)
from baatt.kernels.mosaic_gpu.forward_kernel import forward


def why_unavailable(q, k, v, config, interpret) -> str | None:
    """Every reason the kernels cannot run these inputs here, joined with "; ", or None."""
    no_interpret = None
    if interpret:
        no_interpret = ("interpret mode is not offered for mosaic_gpu "
                        "(use implementation='pallas' with interpret=True)")
    return join_reasons(no_interpret, config.mask.block_size_rule(config.block_q, config.block_k),
                        platform.hopper_reason(),
                        unsupported_reason(q.shape, k.shape, v.shape, q.dtype, config.block_q, config.block_k))


def sparse_op(space, indices, counts, *, scale, interpret=False):
    """``Implementation.sparse_op``: the kernels on a ``baatt.layout.BlockSpace``."""
    return block_sparse_attention(
        space.q, space.k, space.v, space.kv_valid, indices, counts, scale=float(scale),
        block_q=space.block_q, block_k=space.block_k, all_valid=space.keys_all_valid, interpret=interpret,
        mask=space.mask,
    )


IMPLEMENTATION = Implementation(
    name="mosaic_gpu",
    priority=20,
    why_unavailable=why_unavailable,
    sparse_op=sparse_op,
    reference="baatt.reference.attention.block_sparse_blocked",
    positional_op=positional_attention,
)

__all__ = [
    "DEFAULT_BWD_TUNING",
    "DEFAULT_TUNING",
    "IMPLEMENTATION",
    "PERSISTENT_MAX_STEPS",
    "BwdTuning",
    "Tuning",
    "backward",
    "block_sparse_attention",
    "forward",
    "pack_selection",
    "positional_attention",
    "sparse_op",
    "unsupported_reason",
    "why_unavailable",
]
