"""Oracle: top blocks of the exact post-downsample map M_hat (SPEC.md section 1).

The upper bound of any selector in the same block space: with ``sort_q`` /
``sort_k`` on, ``M_hat`` is pooled over norm-sorted blocks. Costs a dense
attention pass (streamed, memory linear in L).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.reference.downsample import post_downsample_blocked, sort_permutations
from baatt.selection.common import finish, key_block_counts, mask_empty
from baatt.selection.types import BlockSelection


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    q_perm, k_perm = sort_permutations(q, k, config, key_mask)
    space = layout.to_block_space(
        q, k, None, block_q=config.block_q, block_k=config.block_k,
        key_mask=key_mask, q_perm=q_perm, k_perm=k_perm,
    )
    m_hat = post_downsample_blocked(space, scale=1.0 / math.sqrt(q.shape[-1]))
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    scores = mask_empty(jnp.log(jnp.maximum(m_hat, 1e-38)), kcount)
    return finish(scores, q, k, config, q_perm=q_perm, k_perm=k_perm, probs=m_hat)
