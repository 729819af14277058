"""Block selectors behind one interface, and the two entry points over them.

docs/spec.md section 9. A selector is one module that defines
``select(q, k, config, *, key_mask) -> BlockSelection``, ``block_map`` (its own
estimate of the block attention map) and, if it takes any, a frozen params
dataclass, and registers them with ``register_selector`` when imported. This
package imports the built-in ones once, below; a user's selector module registers
when it is imported. Every selector ends in the same budget step
(``budget.select_from_scores``), so they compare at equal budgets.

The attention mask travels in ``config.mask`` (``is_causal=True`` sets a causal
one): a selector scores only what the mask lets a query see, the budget step
never keeps a block pair the mask hides, and the selection carries the mask.
"""

from __future__ import annotations

import functools

import jax

from baatt import layout
from baatt.attention_mask import with_is_causal
from baatt.config import BAConfig, check_switches
from baatt.selection.budget import forced_blocks, select_from_scores
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SELECTORS, Selector, SelectorParamError, get_selector, register_selector
from baatt.validation import check_finite, check_qk, check_sink_positions

# The built-in selectors register themselves on import; this order is the order of baatt.SELECTORS.
# isort: off
from baatt.selection import baatt, meanpool, oracle, xattention, last_query, sparge_like, random, dense  # noqa: F401
from baatt.selection import query_token, max_oracle, mixed, quest, proxy, pooled_query  # noqa: F401
from baatt.selection.last_query import LastQueryParams
from baatt.selection.mixed import MixedParams
from baatt.selection.proxy import ProxyParams
from baatt.selection.query_token import QueryTokenParams
from baatt.selection.quest import QuestParams
from baatt.selection.random import RandomParams
from baatt.selection.sparge_like import SpargeParams
from baatt.selection.xattention import XAttentionParams
# isort: on


def _selector_name(config: BAConfig, selector: str | None) -> str:
    name = config.selector if selector is None else selector
    get_selector(name)  # an unknown name raises here, naming the registered ones
    check_switches(config, name)  # BAConfig checked its own selector; an override is checked here
    return name


def select_blocks(q, k, config: BAConfig | None = None, *, selector: str | None = None, key_mask=None,
                  is_causal: bool = False) -> BlockSelection:
    """Compact block selection of ``selector`` (default: ``config.selector``).

    q [B, Lq, Hq, D], k [B, Lk, Hkv, D]; returns indices [B, Hq, Nq, kmax] and counts [B, Hq, Nq].
    ``is_causal``: select under a causal mask (shorthand for ``config.mask=AttentionMask.causal()``,
    as in ``baatt.attention``); the selection carries its mask.
    """
    config = BAConfig() if config is None else config
    if not isinstance(config, BAConfig):
        raise ValueError(f"config must be a baatt.BAConfig; got {type(config).__name__}")
    config = with_is_causal(config, is_causal)
    name = _selector_name(config, selector)
    check_qk(q, k, key_mask=key_mask)
    check_sink_positions(config, k.shape[1])
    key_mask = layout.visible_key_mask(key_mask, config.mask, q.shape[0], q.shape[1], k.shape[1])
    check_finite(q=q, k=k, key_mask=key_mask)
    return _select_jit(q, k, key_mask, config, name)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _select_jit(q, k, key_mask, config, selector):
    # One compiled program per (shapes, config): eager op-by-op dispatch of the
    # selectors costs seconds per new shape.
    return get_selector(selector).select(q, k, config, key_mask=key_mask)


def block_map(q, k, config: BAConfig | None = None, *, selector: str | None = None, key_mask=None,
              is_causal: bool = False):
    """The selector's own estimate of the block attention map, rows normalised: [B, Hq, Nq, Nk].

    In the selector's block space (sorted when BA-Att sorts), so that it can be
    compared with the oracle ``M_hat`` of the same space (total variation, KL).
    Each selector's ``block_map`` says what it is: baatt/meanpool the softmax of
    the block logits (docs/spec.md section 2); oracle ``M_hat``; xattention and
    last_query their block mass; sparge_like the softmax of its pooled logits;
    random and dense uniform over the non-empty blocks. Under a causal ``config.mask``
    (or ``is_causal``) the pairs the mask hides have 0.
    """
    config = with_is_causal(BAConfig() if config is None else config, is_causal)
    name = _selector_name(config, selector)
    check_qk(q, k, key_mask=key_mask)
    check_sink_positions(config, k.shape[1])
    return _block_map_jit(q, k, key_mask, config, name)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _block_map_jit(q, k, key_mask, config, selector):
    return get_selector(selector).block_map(q, k, config, key_mask=key_mask)


__all__ = [
    "SELECTORS",
    "BlockSelection",
    "LastQueryParams",
    "MixedParams",
    "ProxyParams",
    "QueryTokenParams",
    "QuestParams",
    "RandomParams",
    "Selector",
    "SelectorParamError",
    "SpargeParams",
    "XAttentionParams",
    "block_map",
    "forced_blocks",
    "get_selector",
    "register_selector",
    "select_blocks",
    "select_from_scores",
]
