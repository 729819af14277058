"""Hopper (sm90) block-sparse attention in Pallas Mosaic GPU; registers ``implementation="mosaic_gpu"``.

Forward: warp-specialised TMA + wgmma kernel (``block_sparse.py``), one CTA per query tile or, on
short walks, persistent (``Tuning.persistent``). Backward:
warp-specialised dq and dk/dv kernels (``BwdTuning``), or the portable Pallas kernels. Picked first by
``implementation=None`` on a GPU of compute capability 9.x for bf16/f16 inputs,
head dim 64 or 128, block_q 128 or 256 and block_k 64, 128 or 256; anything
else falls back to the next implementation, and asking for it explicitly
raises with the reason.
"""

from __future__ import annotations

import jax

from baatt.api import Implementation, register_implementation
from baatt.kernels.mosaic_gpu.block_sparse import (
    DEFAULT_BWD_TUNING,
    DEFAULT_TUNING,
    BwdTuning,
    Tuning,
    block_sparse_attention,
    forward,
    pack_selection,
    positional_attention,
    unsupported_reason,
)


def hopper_reason() -> str | None:
    """None when a Hopper (sm90) GPU is present, else why not."""
    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        gpus = []
    if not gpus:
        return "no CUDA GPU found (the Mosaic GPU kernel needs an sm90 GPU)"
    cc = getattr(gpus[0], "compute_capability", None)
    if cc is None or not str(cc).startswith("9"):
        return f"the Mosaic GPU kernel is built for sm90 (Hopper); this GPU reports compute capability {cc}"
    return None


def unavailable(q, k, v, config, interpret) -> str | None:
    if interpret:
        return "interpret mode is not offered for mosaic_gpu (use implementation='pallas' with interpret=True)"
    if reason := hopper_reason():
        return reason
    return unsupported_reason(q.shape, k.shape, v.shape, q.dtype, config.block_q, config.block_k)


def sparse(space, indices, counts, *, scale, interpret=False):
    return block_sparse_attention(
        space.q, space.k, space.v, space.kv_valid, indices, counts, scale=float(scale),
        block_q=space.block_q, block_k=space.block_k, all_valid=space.keys_all_valid, interpret=interpret,
    )


register_implementation(Implementation(name="mosaic_gpu", priority=20, unavailable=unavailable, sparse=sparse,
                                       positional=positional_attention))

__all__ = [
    "DEFAULT_BWD_TUNING",
    "DEFAULT_TUNING",
    "BwdTuning",
    "Tuning",
    "block_sparse_attention",
    "forward",
    "hopper_reason",
    "pack_selection",
    "positional_attention",
    "sparse",
    "unavailable",
    "unsupported_reason",
]
