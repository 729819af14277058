"""Block selectors behind one interface: ``(q, k, config, *, key_mask) -> BlockSelection``.

SPEC.md section 9. Every selector ends in the same budget step
(``budget.select_from_scores``), so they compare at equal budgets.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from baatt.config import SELECTORS, BAConfig
from baatt.reference.downsample import estimate, post_downsample_map, sort_permutations
from baatt.selection.budget import forced_blocks, select_from_scores
from baatt.selection.types import BlockSelection
from baatt.validation import check_finite, check_qk


def get_selector(name: str):
    if name not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}; got {name!r}")
    return importlib.import_module(f"baatt.selection.{name}").select


def select_blocks(q, k, config: BAConfig | None = None, *, selector: str | None = None, key_mask=None) -> BlockSelection:
    """Compact block selection of ``selector`` (default: ``config.selector``).

    q [B, Lq, Hq, D], k [B, Lk, Hkv, D]; returns indices [B, Hq, Nq, kmax] and counts [B, Hq, Nq].
    """
    config = BAConfig() if config is None else config
    if not isinstance(config, BAConfig):
        raise ValueError(f"config must be a baatt.BAConfig; got {type(config).__name__}")
    check_qk(q, k, key_mask=key_mask)
    check_finite(q=q, k=k, key_mask=key_mask)
    return _select_jit(q, k, key_mask, config, config.selector if selector is None else selector)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _select_jit(q, k, key_mask, config, selector):
    # One compiled program per (shapes, config): eager op-by-op dispatch of the
    # selectors costs seconds per new shape.
    return get_selector(selector)(q, k, config, key_mask=key_mask)


def block_map(q, k, config: BAConfig | None = None, *, selector: str | None = None, key_mask=None):
    """The selector's own estimate of the block attention map, rows normalised: [B, Hq, Nq, Nk].

    In the selector's block space (sorted when BA-Att sorts), so that it can be
    compared with the oracle ``M_hat`` of the same space (total variation, KL).
    baatt/meanpool: softmax of the block logits (SPEC.md section 2); oracle:
    ``M_hat``; xattention / last_query: their block mass; sparge_like: softmax
    of its pooled logits; random / dense: uniform over non-empty blocks.
    """
    config = BAConfig() if config is None else config
    check_qk(q, k, key_mask=key_mask)
    return _block_map_jit(q, k, key_mask, config, config.selector if selector is None else selector)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _block_map_jit(q, k, key_mask, config, selector):
    if selector == "meanpool":
        config, selector = config.replace(sort_q=False, sort_k=False, compensate=False), "baatt"
    if selector == "baatt":
        return jax.nn.softmax(estimate(q, k, config, key_mask=key_mask).scores, axis=-1)
    if selector == "oracle":
        q_perm, k_perm = sort_permutations(q, k, config, key_mask)
        return post_downsample_map(q, k, block_size=config.block_q, block_size_k=config.block_k,
                                   key_mask=key_mask, q_perm=q_perm, k_perm=k_perm)
    if selector in ("xattention", "last_query"):
        mass = importlib.import_module(f"baatt.selection.{selector}").block_scores(q, k, config, key_mask=key_mask)[1]
        return mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-30)
    if selector == "sparge_like":
        logits = importlib.import_module("baatt.selection.sparge_like").block_scores(q, k, config, key_mask=key_mask)[2]
        return jax.nn.softmax(logits, axis=-1)
    est = estimate(q, k, config.replace(sort_q=False, sort_k=False), key_mask=key_mask)
    return jax.nn.softmax(jnp.where(jnp.isfinite(est.scores), 0.0, -jnp.inf), axis=-1)


__all__ = [
    "block_map","BlockSelection", "forced_blocks", "get_selector", "select_blocks", "select_from_scores"]
