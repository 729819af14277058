"""Block selectors behind one interface: ``(q, k, config, *, key_mask) -> BlockSelection``.

SPEC.md section 9. Every selector ends in the same budget step
(``budget.select_from_scores``), so they compare at equal budgets.
"""

from __future__ import annotations

import functools
import importlib

import jax

from baatt.config import SELECTORS, BAConfig
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


__all__ = ["BlockSelection", "forced_blocks", "get_selector", "select_blocks", "select_from_scores"]
