"""Separate key budgets for the prompt and the generation: the ``"prompt_gen"`` selector.

A masked-diffusion canvas is a prompt followed by the positions to generate. The prompt's
keys are many and settle once; the generation's keys are few and change at every step as
mask tokens become words. ``prompt_gen`` runs a base selector twice, over the key blocks
of the prompt with one sparsity and over those of the generation with another, and keeps
both sets: each query block attends to ``ceil((1 - prompt_sparsity) * Np)`` of the ``Np``
prompt blocks and ``ceil((1 - gen_sparsity) * Ng)`` of the ``Ng`` generation blocks.

The regions split at a key block boundary: the block holding the first generated position
(``prompt_length``) and every block after it form the generation region. Each region is
selected as a sequence of its own keys, so forced sink positions move to the region that
holds them. Positional regions need unsorted keys and a bidirectional mask.

Importing ``baatt.diffusion`` registers the selector::

    cfg = BAConfig(block_size=128, selector="prompt_gen",
                   selector_params=PromptGenParams(prompt_length=4096, prompt_sparsity=0.9, gen_sparsity=0.5))
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SELECTORS, SelectorParamError, get_selector, register_selector

NAME = "prompt_gen"


@dataclasses.dataclass(frozen=True)
class PromptGenParams:
    """prompt_length: tokens before the first generated position (0: every key is in the generation region).
    prompt_sparsity / gen_sparsity: fraction of each region's key blocks skipped, in [0, 1).
    base: the registered selector that ranks the blocks of each region."""

    prompt_length: int = 0
    prompt_sparsity: float = 0.0
    gen_sparsity: float = 0.0
    base: str = "baatt"

    def __post_init__(self):
        if self.prompt_length < 0:
            raise SelectorParamError(self, "prompt_length", "must be an int >= 0")
        for name in ("prompt_sparsity", "gen_sparsity"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0.0 <= value < 1.0:
                raise SelectorParamError(self, name, "must be a finite number in [0, 1)")
        if self.base == NAME or self.base not in SELECTORS:
            raise SelectorParamError(self, "base", f"must be a registered selector other than {NAME!r} "
                                                   f"(one of {tuple(n for n in SELECTORS if n != NAME)})")


def _base_config(config: BAConfig, params: PromptGenParams, **changes) -> BAConfig:
    return config.replace(selector=params.base, selector_params=None, **changes)


def _check_config(config: BAConfig) -> None:
    rules = [(config.sparsity is not None or config.tau is not None or config.peak_margin is not None,
              "takes its budgets from PromptGenParams: BAConfig.sparsity, tau and peak_margin must be None"),
             (config.sort_k or config.cluster_k, "splits keys by position: BAConfig.sort_k and cluster_k must be False"),
             (config.local_window > 0, "selects each region as a sequence of its own: BAConfig.local_window must be 0"),
             (not config.mask.is_bidirectional, f"needs a bidirectional mask; got {config.mask.describe()}")]
    for broken, rule in rules:
        if broken:
            raise ValueError(f"selector {NAME!r} {rule}")


def _region_config(config: BAConfig, params: PromptGenParams, sparsity: float, first: int, end: int) -> BAConfig:
    """The base selector's config over the keys [first, end): its sparsity and the sink positions it holds."""
    sinks = tuple(p - first for p in config.sink_positions if first <= p < end)
    if config.force_sink and sinks:
        return _base_config(config, params, sparsity=sparsity, sink_positions=sinks)
    return _base_config(config, params, sparsity=sparsity, force_sink=False, sink_positions=(0,))


def _merge(prompt: BlockSelection, gen: BlockSelection, offset: int) -> BlockSelection:
    """One selection holding the kept blocks of both regions; the generation's ids move up by ``offset``."""
    ids = jnp.concatenate([prompt.indices, gen.indices + offset], axis=-1)
    live = jnp.concatenate([jnp.arange(prompt.kmax) < prompt.counts[..., None],
                            jnp.arange(gen.kmax) < gen.counts[..., None]], axis=-1)
    # Prompt ids are below the offset and generation ids above it: sorting the live ones (dead ones last)
    # lists both regions ascending, as BlockSelection requires.
    big = jnp.iinfo(jnp.int32).max
    ordered = jnp.sort(jnp.where(live, ids, big), axis=-1)
    counts = prompt.counts + gen.counts
    last = jnp.take_along_axis(ordered, (counts - 1)[..., None], axis=-1)
    indices = jnp.where(jnp.arange(ids.shape[-1]) < counts[..., None], ordered, last).astype(jnp.int32)
    return dataclasses.replace(prompt, indices=indices, counts=counts)


def select(q, k, config: BAConfig, *, key_mask=None, query_positions=None) -> BlockSelection:
    params = config.params_for(NAME)
    _check_config(config)
    length_k = k.shape[1]
    # Whole key blocks of the prompt; the block holding the first generated position is the generation's.
    boundary = min(params.prompt_length // config.block_k * config.block_k, length_k)
    base = get_selector(params.base)
    if query_positions is not None and not base.query_positions:
        raise ValueError(f"query_positions: the base selector {params.base!r} of {NAME!r} estimates from queries of "
                         "its own choice")
    extra = {} if query_positions is None else dict(query_positions=query_positions)

    def select_region(sparsity, first, end):
        mask = None if key_mask is None else key_mask[:, first:end]
        return base.select(q, k[:, first:end], _region_config(config, params, sparsity, first, end), key_mask=mask,
                           **extra)

    if boundary == 0:
        return select_region(params.gen_sparsity, 0, length_k)
    if boundary == length_k:
        return select_region(params.prompt_sparsity, 0, length_k)
    prompt = select_region(params.prompt_sparsity, 0, boundary)
    gen = select_region(params.gen_sparsity, boundary, length_k)
    return _merge(prompt, gen, boundary // config.block_k)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The base selector's map over every key: the regions change the budgets, not the estimate."""
    params = config.params_for(NAME)
    _check_config(config)
    return get_selector(params.base).block_map(q, k, _base_config(config, params), key_mask=key_mask)


# The base selector runs on config.replace(selector=base): BAConfig checks the switches against it there
# (sort_k and cluster_k are refused above: the regions split the keys by position).
register_selector(NAME, select=select, block_map=block_map, params=PromptGenParams, query_positions=True,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate"))
