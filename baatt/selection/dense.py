"""Dense: every key block that holds a valid key (the reference, through the sparse pipeline)."""

from __future__ import annotations

import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import finish, key_block_counts, mask_empty, positional_space, uniform_block_map
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    space = positional_space(q, k, config, key_mask)
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    scores = jnp.zeros((q.shape[0], q.shape[2], space.num_q_blocks, space.num_k_blocks))
    dense = config.replace(sparsity=None, tau=None, peak_margin=None, force_sink=False, local_window=0)
    return finish(mask_empty(scores, kcount), q, k, dense)


# Every block kept: the same attention in any block order, with or without a compensated estimate.
register_selector("dense", select=select, block_map=uniform_block_map,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate"))
