"""Random blocks at the same budget: the floor every selector must beat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import (
    finish,
    key_block_counts,
    mask_empty,
    mask_hidden,
    positional_space,
    uniform_block_map,
)
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


@dataclasses.dataclass(frozen=True)
class RandomParams:
    """seed: of the random block scores (``BAConfig(seed=...)``)."""

    seed: int = 0


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    seed = config.params_for("random").seed
    space = positional_space(q, k, config, key_mask)
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    nq, nk = space.num_q_blocks, space.num_k_blocks
    scores = jax.random.uniform(jax.random.key(seed), (q.shape[0], q.shape[2], nq, nk))
    # Under tau, a random ranking with uniform mass keeps ceil(tau * N) blocks.
    return finish(mask_hidden(mask_empty(scores, kcount), q, k, config), q, k, config, probs=jnp.ones_like(scores))


register_selector("random", select=select, block_map=uniform_block_map, params=RandomParams)
