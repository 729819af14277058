"""Oracle: top blocks of the exact post-downsample map M_hat (docs/spec.md section 1).

The upper bound of any selector in the same block space: with ``sort_q`` /
``sort_k`` on, ``M_hat`` is pooled over norm-sorted blocks. Costs a dense
attention pass (streamed, memory linear in L): on a CUDA GPU, through the
Pallas oracle-map kernels (``baatt.kernels.pallas_triton.oracle``) where they
support the shapes, elsewhere through the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from baatt import layout, platform
from baatt.config import BAConfig
from baatt.kernels.pallas_triton import oracle as oracle_kernel
from baatt.reference.downsample import post_downsample_blocked, post_downsample_map
from baatt.selection.common import finish, key_block_counts, mask_empty, mask_hidden
from baatt.selection.estimator import ordered_space, sort_permutations
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


def oracle_map(space: layout.BlockSpace, scale: float, *, kernel: bool | None = None) -> jax.Array:
    """M_hat [B, Hq, Nq, Nk] of a block space (under its mask); kernel None = the GPU kernel where it applies."""
    if kernel is None:
        kernel = platform.has_gpu() and oracle_kernel.unsupported_reason(
            space.q.shape, space.k.shape, space.k.shape, space.q.dtype, space.block_q, space.block_k) is None
    if kernel:
        return oracle_kernel.post_downsample_blocked(space.q, space.k, space.kv_valid, space.q_valid, scale=scale,
                                                     block_q=space.block_q, block_k=space.block_k,
                                                     mask=space.mask)
    return post_downsample_blocked(space, scale=scale)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    space, q_perm, k_perm = ordered_space(q, k, config, key_mask)
    m_hat = oracle_map(space, 1.0 / math.sqrt(q.shape[-1]))
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    scores = mask_hidden(mask_empty(jnp.log(jnp.maximum(m_hat, 1e-38)), kcount), q, k, config)
    return finish(scores, q, k, config, q_perm=q_perm, k_perm=k_perm, probs=m_hat)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``M_hat`` itself (the reference's streamed map), in the (sorted) block space of the selection."""
    q_perm, k_perm = sort_permutations(q, k, config, key_mask)
    return post_downsample_map(q, k, block_size=config.block_q, block_size_k=config.block_k,
                               key_mask=key_mask, q_perm=q_perm, k_perm=k_perm, mask=config.mask)


# Compensation corrects an estimate; the oracle has none, so its selection is the same either way.
register_selector("oracle", select=select, block_map=block_map,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate"))
