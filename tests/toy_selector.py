"""A selector in one file, as a user would write it: every other key block.

It keeps the key blocks whose id has the parity ``EveryOtherParams.parity``, lowest
ids first under the budget, and its block map is uniform over them. Importing this
module registers it as ``"every_other"``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from baatt.selection import SelectorParamError, register_selector
from baatt.selection.common import finish, key_block_counts, mask_empty, positional_space


@dataclasses.dataclass(frozen=True)
class EveryOtherParams:
    """parity: 0 keeps the even key blocks, 1 the odd ones."""

    parity: int = 0

    def __post_init__(self):
        if self.parity not in (0, 1):
            raise SelectorParamError(self, "parity", "must be 0 or 1")


def _scores(q, k, config, key_mask):
    """0 for the blocks of the chosen parity, -1 for the others, -inf for blocks without a valid key."""
    space = positional_space(q, k, config, key_mask)
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    parity = config.params_for("every_other").parity
    wanted = jnp.arange(space.num_k_blocks) % 2 == parity
    scores = jnp.where(wanted, 0.0, -1.0) - 1e-3 * jnp.arange(space.num_k_blocks)  # lower ids first
    shape = (q.shape[0], q.shape[2], space.num_q_blocks, space.num_k_blocks)
    return mask_empty(jnp.broadcast_to(scores, shape), kcount), wanted


def select(q, k, config, *, key_mask=None):
    return finish(_scores(q, k, config, key_mask)[0], q, k, config)


def block_map(q, k, config, *, key_mask=None):
    """Uniform over the valid key blocks of the chosen parity (over every valid one in a row without such)."""
    scores, wanted = _scores(q, k, config, key_mask)
    valid = jnp.isfinite(scores)
    kept = valid & wanted
    kept = jnp.where(jnp.any(kept, axis=-1, keepdims=True), kept, valid)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


register_selector("every_other", select=select, block_map=block_map, params=EveryOtherParams)
