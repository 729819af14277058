"""Static parameters of the Mosaic GPU kernels: CTA shape, tunings and their defaults, supported inputs."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from baatt.kernels.common import join_reasons

WG_ROWS = 64  # query rows per consumer warpgroup (one wgmma M tile)
CONSUMERS = 2
TILE_Q = WG_ROWS * CONSUMERS  # query rows per CTA
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_BLOCK_Q = (128, 256)
SUPPORTED_BLOCK_K = (64, 128, 256)
SMEM_BYTES = 227 * 1024  # shared memory a CTA may use on sm90


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Static launch parameters of the forward kernel.

    tile_k: key rows per pipeline step (<= block_k, divides it; 64 or 128).
    stages: shared-memory slots in the K/V ring (>= 2).
    rotate: start each CTA's walk at a different selected tile.
    tile_major: query tiles vary fastest in the launch order, so CTAs running together share a head's
      K/V in L2 (default); False: heads fastest. For ``persistent``, the order in which CTAs take work
      items (heads fastest was slower).
    persistent: one CTA per SM walks many (query tile, head, batch) items with the K/V ring running
      on across them and the next item's Q double-buffered (see ``forward``). None: persistent when a
      row's walk is at most ``PERSISTENT_MAX_STEPS`` tiles (``kmax * block_k / tile_k``): short walks
      are where a CTA's start and end show, while on long walks the static item order loses the L2
      locality of the hardware's launch order.
    ctas: with ``persistent``, how many CTAs (None: one per SM; tests use a few to make each walk long).
    None means "derive" (see ``resolve``). Measurements behind the defaults:
    ``experiments/results/bench_sparse/bench_sparse_mosaic_gpu_fwd_tune_h200.md``.
    """

    tile_k: int | None = None
    stages: int | None = None
    rotate: bool = True
    tile_major: bool = True
    persistent: bool | None = None
    ctas: int | None = None

    def resolve(self, block_k: int, head_dim: int, itemsize: int, kmax: int | None = None) -> Tuning:
        """Every None derived; ``kmax``: width of the selection's id lists (None: unknown, not persistent)."""
        tile_k = self.tile_k or min(block_k, 128)
        if tile_k not in (64, 128) or block_k % tile_k:
            raise ValueError(f"Tuning.tile_k must be 64 or 128 and divide block_k={block_k}; got {tile_k}")
        persistent = self.persistent
        if persistent is None:
            persistent = kmax is not None and kmax * (block_k // tile_k) <= PERSISTENT_MAX_STEPS
        per_stage = 2 * tile_k * head_dim * itemsize + 4 * tile_k
        fixed = q_buffers(persistent) * (TILE_Q * head_dim * itemsize + 4 * TILE_Q) + 4096
        stages = self.stages or max(2, min(4, (SMEM_BYTES - fixed) // per_stage))
        if self.ctas is not None and (self.persistent is False or self.ctas < 1):
            raise ValueError(f"Tuning.ctas must be a positive int and not set with persistent=False; got {self.ctas}")
        if stages < 2:
            raise ValueError(f"Tuning.stages must be >= 2; got {stages}")
        if fixed + stages * per_stage > SMEM_BYTES:
            raise ValueError(f"Tuning.stages={stages} needs more than {SMEM_BYTES} bytes of shared memory")
        return dataclasses.replace(self, tile_k=tile_k, stages=stages, persistent=persistent)


def q_buffers(persistent: bool) -> int:
    """Buffers of the forward's Q tile (which stages the output) and lse: the persistent forward loads the
    next item's Q beside the current one."""
    return 2 if persistent else 1


# Longest walk (tiles per row) on which ``Tuning.persistent=None`` picks the persistent forward: H200
# measurements at 32K/128K tokens, 0-95% sparsity
# (experiments/results/bench_sparse/bench_sparse_mosaic_gpu_fwd_tune_h200.md): it won at 13-77 tiles
# at 32K and at 52 at 128K, lost at 103-512 tiles at 128K.
PERSISTENT_MAX_STEPS = 64

DEFAULT_TUNING = Tuning()


@dataclasses.dataclass(frozen=True)
class BwdTuning:
    """Static parameters of the Mosaic GPU backward (dq and dk/dv kernels).

    pingpong: the two consumer warpgroups alternate on the tensor cores through a schedule barrier.
      Off by default: it made dq slower and dk/dv no faster.
    dkv_stages: Q/dO ring depth of the dk/dv kernel (None: as many as fit, at most 4; 3 was slower).
    rotate: each CTA starts its walk at a different selected tile (the sums are order-free); faster
      than walking every list from its start.
    tile_major: tiles vary fastest in the launch order (default); False: heads fastest (slower).
    Measurements behind the defaults: ``experiments/results/bench_backward/bench_backward_h200.md`` and
    ``experiments/results/archive/bench_backward_h200_tune.md``.
    """

    pingpong: bool = False
    dkv_stages: int | None = None
    rotate: bool = True
    tile_major: bool = True


DEFAULT_BWD_TUNING = BwdTuning()

BWD_TILE_Q = 64  # query rows per dk/dv step
SUPPORTED_BWD_BLOCK_K = (128, 256)  # block_k of the Mosaic GPU backward; 64 falls back to the Pallas kernels
BACKWARD_IMPLS = ("mosaic_gpu", "pallas")


def unsupported_reason(q_shape, k_shape, v_shape, dtype, block_q: int, block_k: int) -> str | None:
    """Every rule these shapes/dtype break for the Mosaic GPU kernels, joined with "; ", or None."""
    d = q_shape[-1]
    reasons = []
    if d not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim must be one of {SUPPORTED_HEAD_DIMS} for mosaic_gpu; got {d}")
    if k_shape[-1] != d or v_shape[-1] != d:
        reasons.append(f"q, k and v must share the head dim for mosaic_gpu; got {q_shape[-1]}, {k_shape[-1]}, "
                       f"{v_shape[-1]}")
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
        reasons.append(f"dtype must be bfloat16 or float16 for mosaic_gpu (wgmma); got {jnp.dtype(dtype).name}")
    if block_q not in SUPPORTED_BLOCK_Q:
        reasons.append(f"block_q must be one of {SUPPORTED_BLOCK_Q} for mosaic_gpu; got {block_q}")
    if block_k not in SUPPORTED_BLOCK_K:
        reasons.append(f"block_k must be one of {SUPPORTED_BLOCK_K} for mosaic_gpu; got {block_k}")
    return join_reasons(*reasons)
