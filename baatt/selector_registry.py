"""The registry of block selectors: the one list of names ``BAConfig.selector`` may hold.

A selector is a module that calls :func:`register_selector` when it is imported: the
built-in ones are imported once by ``baatt.selection``; a user's selector registers
when the user imports its module. ``baatt.SELECTORS`` is a live, read-only view of
this registry, and ``BAConfig``, ``select_blocks`` and ``block_map`` all look names
up here.

This module imports nothing from baatt. It sits below ``baatt.config`` (which
validates names against it) and therefore outside the ``baatt.selection`` package,
whose selectors import ``baatt.config``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Selector:
    """A registered block selector.

    Attributes:
      name: what ``BAConfig(selector=...)``, ``select_blocks(selector=...)`` and
        ``block_map(selector=...)`` accept.
      select: ``(q, k, config, *, key_mask) -> BlockSelection``.
      block_map: ``(q, k, config, *, key_mask) -> [B, Hq, Nq, Nk]`` float32, each row
        summing to 1: the selector's own estimate of the block attention map, in the
        block space its selection refers to.
      params: the frozen dataclass of its parameters (an instance goes in
        ``BAConfig.selector_params``), or None when it takes none.
      query_positions: whether ``select`` also takes ``query_positions`` [B or 1, m] (int):
        the queries to estimate from (``baatt.attention(query_positions=...)``), for a
        selector that reads a subset of the queries (``last_query``).
      switches: the ``BAConfig`` switches of ``SWITCHES`` it honours (it orders its blocks
        by them, or its selection does not depend on them); ``BAConfig`` refuses the others
        for this selector rather than let it ignore them.
    """

    name: str
    select: Callable
    block_map: Callable
    params: type | None = None
    query_positions: bool = False
    switches: frozenset[str] = frozenset()


class SelectorParamError(ValueError):
    """A selector parameter outside its rule.

    It carries the field, the rule and the value, so that ``BAConfig`` can name the
    keyword the value came from (``xattn_stride`` rather than ``XAttentionParams.stride``).
    """

    def __init__(self, params, field: str, rule: str):
        self.field, self.rule, self.value = field, rule, getattr(params, field)
        super().__init__(f"{type(params).__name__}.{field} {rule}; got {self.value!r}")


# BAConfig switches that change the block space or the scores, which a selector may not apply.
SWITCHES = ("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate")

_REGISTERED: dict[str, Selector] = {}

# Live and read-only: name -> Selector, in registration order.
SELECTORS: Mapping[str, Selector] = types.MappingProxyType(_REGISTERED)


def register_selector(name: str, *, select: Callable, block_map: Callable, params: type | None = None,
                      query_positions: bool = False, switches=()) -> Selector:
    """Add a selector under ``name`` and return its record.

    ``select`` and ``block_map`` take ``(q, k, config, *, key_mask)``; ``params`` is the
    frozen dataclass of the selector's parameters (its fields need defaults: with
    ``selector_params=None`` the selector runs on ``params()``). With
    ``query_positions=True``, ``select`` also takes ``query_positions=None`` (the queries to
    estimate from; ``Selector.query_positions``). ``switches``: the names of ``SWITCHES`` that
    ``select`` honours (default none: ``BAConfig`` refuses ``sort_q=True`` and the others for it).
    A name can be registered once.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"selector name must be a non-empty str; got {name!r}")
    if name in _REGISTERED:
        raise ValueError(f"selector {name!r} is already registered")
    for arg, fn in (("select", select), ("block_map", block_map)):
        if not callable(fn):
            raise ValueError(f"{arg} of selector {name!r} must be callable; got {fn!r}")
    if params is not None and not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise ValueError(f"params of selector {name!r} must be a dataclass type or None; got {params!r}")
    if not isinstance(query_positions, bool):
        raise ValueError(f"query_positions of selector {name!r} must be a bool; got {query_positions!r}")
    if isinstance(switches, str) or not set(switches) <= set(SWITCHES):
        raise ValueError(f"switches of selector {name!r} must be a collection of names from {SWITCHES}; "
                         f"got {switches!r}")
    _REGISTERED[name] = Selector(name, select, block_map, params, query_positions, frozenset(switches))
    return _REGISTERED[name]


def get_selector(name: str) -> Selector:
    """The registered selector ``name``; ValueError naming every registered one otherwise."""
    try:
        return _REGISTERED[name]
    except (KeyError, TypeError):
        raise ValueError(f"selector must be one of {tuple(_REGISTERED)}; got {name!r}") from None
