"""Per-head budgets: selection under a count per head, and their calibration on sampled Q/K.

Heads differ: some attend to a few blocks, others spread their mass over the whole context,
so one budget for every head spends blocks where they are not needed and starves the heads
that need them. Here a budget is a count of kept key blocks per (layer, head):

- :func:`select_with_budget` keeps the top ``count[h]`` key blocks of every query block of
  head ``h``, ranked by the selector's own ``block_map`` (its estimate of the block attention
  map) in the selector's block space. The counts are a traced array and the list width
  ``kmax`` a static one, so one program serves every set of counts.
- :func:`calibrate_budgets` finds them from a few samples of Q/K per layer (e.g.
  ``baatt.nn.capture_qkv``): per head, the smallest count whose oracle recall (the share of
  the oracle map ``M_hat`` that the selector's top blocks keep, averaged over query blocks and
  samples) reaches ``target_recall``, read off one sorted pass over the ranking; or, for a
  ``target_density``, the common recall level whose counts spend that density (bisection).
- :class:`Budgets` holds the result and saves it as a small JSON file;
  ``baatt.nn.AttentionPlan.ba(config, budgets=Budgets.load(path))`` runs a model with it.

Calibrated counts are fractions of the calibration length's key blocks: at another length
``Budgets.head_counts`` scales them (rounding up).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from baatt import layout
from baatt.config import BAConfig
from baatt.reference.downsample import post_downsample_map
from baatt.selection.budget import forced_blocks, select_from_scores
from baatt.selection.common import key_block_counts, mask_empty, mask_hidden
from baatt.selection.types import BlockSelection
from baatt.selector_registry import get_selector
from baatt.validation import is_concrete

_FORCED_BONUS = 1e30  # as the budget step's: forced blocks rank first
_FLOOR = -1e30  # a block the selector gives no mass stays a candidate, ranked last


def head_counts_from_budget(head_budget, *, batch: int, q_heads: int, num_k_blocks: int):
    """(counts int32 [Hq] or [B, Hq], kmax): a per-head budget as counts in [1, Nk] and a list width.

    ``head_budget``: ints (kept blocks, >= 1) or floats (kept fractions in (0, 1], rounded up).
    kmax is the largest count when the budget is concrete, else ``num_k_blocks``.
    """
    budget = jnp.asarray(head_budget)
    if budget.shape not in ((q_heads,), (batch, q_heads)):
        raise ValueError(f"head_budget must have shape [Hq] = [{q_heads}] or [B, Hq] = [{batch}, {q_heads}]; "
                         f"got {budget.shape}")
    fractions = jnp.issubdtype(budget.dtype, jnp.floating)
    if not fractions and not jnp.issubdtype(budget.dtype, jnp.integer):
        raise ValueError(f"head_budget must hold ints (block counts) or floats (fractions); got {budget.dtype}")
    if is_concrete(budget):
        values = np.asarray(budget)
        if fractions and not np.all((values > 0) & (values <= 1)):
            raise ValueError(f"head_budget fractions must lie in (0, 1]; got {values.tolist()}")
        if not fractions and values.min() < 1:
            raise ValueError(f"head_budget counts must be >= 1; got {values.tolist()}")
    counts = jnp.ceil(jnp.round(budget * num_k_blocks, 6)) if fractions else budget
    counts = jnp.clip(counts, 1, num_k_blocks).astype(jnp.int32)
    kmax = int(jnp.max(counts)) if is_concrete(counts) else num_k_blocks
    return counts, kmax


def _ranking(q, k, config: BAConfig, key_mask):
    """(priority [B, Hq, Nq, Nk], q_perm, k_perm, forced): the selector's ranking in its block space.

    The selector's ``block_map`` ranks; its ``select`` (under the same config) says in which
    block space. Blocks without a valid key and pairs the mask hides get ``-inf``; forced ones
    come first.
    """
    selector = get_selector(config.selector)
    space_of = selector.select(q, k, config, key_mask=key_mask)
    q_perm, k_perm = space_of.q_perm, space_of.k_perm
    mass = selector.block_map(q, k, config, key_mask=key_mask)
    scores = jnp.where(mass > 0, jnp.log(jnp.maximum(mass, 1e-38)), _FLOOR)
    space = layout.to_block_space(q, k, None, block_q=config.block_q, block_k=config.block_k, key_mask=key_mask,
                                  k_perm=k_perm, mask=config.mask)
    scores = mask_hidden(mask_empty(scores, key_block_counts(space.kv_valid, config.block_k, q.shape[2])),
                         q, k, config)
    forced = forced_blocks(config, length_q=q.shape[1], length_k=k.shape[1], k_perm=k_perm, q_heads=q.shape[2])
    return scores, q_perm, k_perm, forced


def select_with_budget(q, k, config: BAConfig, head_counts, *, kmax: int, key_mask=None) -> BlockSelection:
    """The top ``head_counts[h]`` key blocks of each query block of head ``h`` (int [Hq] or [B, Hq]),
    ranked by ``config.selector``'s ``block_map`` in its block space, forced blocks added.

    ``config``'s budget rule is not used; ``kmax`` (static) is the list width, at least the
    largest count. Counts beyond a row's valid blocks keep every valid block.
    """
    scores, q_perm, k_perm, forced = _ranking(q, k, config, key_mask)
    return select_from_scores(scores, config, forced=forced, q_perm=q_perm, k_perm=k_perm, head_counts=head_counts,
                              kmax=kmax, length_q=q.shape[1], length_k=k.shape[1])


def recall_curves(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """float32 [Hq, Nk]: entry ``[h, c - 1]`` is the oracle mass that head ``h`` keeps with ``c``
    blocks per query block (``select_with_budget``), averaged over query blocks and batch.

    Nondecreasing in ``c``; ``M_hat`` is taken in the selector's block space.
    """
    return _recall_curves_jit(q, k, key_mask, config)


@functools.partial(jax.jit, static_argnums=(3,))
def _recall_curves_jit(q, k, key_mask, config):
    scores, q_perm, k_perm, forced = _ranking(q, k, config, key_mask)
    priority = scores if forced is None else jnp.where(jnp.broadcast_to(forced, scores.shape) & (scores > -jnp.inf),
                                                       _FORCED_BONUS, scores)
    m_hat = post_downsample_map(q, k, block_size=config.block_q, block_size_k=config.block_k, key_mask=key_mask,
                                q_perm=q_perm, k_perm=k_perm, mask=config.mask)
    order = jnp.argsort(-priority, axis=-1, stable=True)  # ties to the lower id, as the budget step
    kept = jnp.cumsum(jnp.take_along_axis(m_hat, order, axis=-1), axis=-1)
    return jnp.mean(kept, axis=(0, 2))


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Calibrated key-block counts per (layer, head), hashable (an ``AttentionPlan`` field) and JSON-able.

    Attributes:
      layers: the calibrated layer indices.
      counts: per layer (in ``layers`` order), the count of each query head.
      num_k_blocks: the key blocks the counts were calibrated at (their denominator).
      recall: per layer and head, the oracle recall the count reached on the samples.
      block_q, block_k, selector: the config they were calibrated with.
      target: what was asked, e.g. ``"recall=0.95"`` or ``"density=0.1"``.
    """

    layers: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    num_k_blocks: int
    recall: tuple[tuple[float, ...], ...]
    block_q: int
    block_k: int
    selector: str
    target: str

    def __post_init__(self):
        if len(self.counts) != len(self.layers) or len(self.recall) != len(self.layers):
            raise ValueError(f"Budgets.counts and recall must hold one row per layer ({len(self.layers)}); "
                             f"got {len(self.counts)} and {len(self.recall)}")
        if any(c < 1 or c > self.num_k_blocks for row in self.counts for c in row):
            raise ValueError(f"Budgets.counts must lie in [1, num_k_blocks={self.num_k_blocks}]")

    def head_counts(self, layer: int, num_k_blocks: int | None = None) -> np.ndarray | None:
        """int32 [Hq] counts of ``layer`` scaled to ``num_k_blocks`` (rounded up), or None if uncalibrated."""
        if layer not in self.layers:
            return None
        counts = np.asarray(self.counts[self.layers.index(layer)], np.int64)
        if num_k_blocks is None or num_k_blocks == self.num_k_blocks:
            return counts.astype(np.int32)
        scaled = -(-counts * num_k_blocks // self.num_k_blocks)
        return np.clip(scaled, 1, num_k_blocks).astype(np.int32)

    @property
    def density(self) -> float:
        """Mean kept share of the key blocks over layers and heads."""
        return float(np.mean(self.counts) / self.num_k_blocks)

    def save(self, path: str | os.PathLike, meta: Mapping | None = None) -> None:
        """Writes the budgets as JSON; ``meta`` (e.g. device, jax version, commit of the calibration
        run) is stored beside them under ``"meta"`` and ignored by ``load``."""
        with open(path, "w") as f:
            json.dump({**dataclasses.asdict(self), **({"meta": dict(meta)} if meta else {})}, f, indent=1,
                      default=str)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Budgets:
        with open(path) as f:
            raw = json.load(f)
        tuples = lambda rows, cast: tuple(tuple(cast(x) for x in row) for row in rows)
        return cls(layers=tuple(raw["layers"]), counts=tuples(raw["counts"], int), num_k_blocks=raw["num_k_blocks"],
                   recall=tuples(raw["recall"], float), block_q=raw["block_q"], block_k=raw["block_k"],
                   selector=raw["selector"], target=raw["target"])


def _qk(sample) -> tuple[jax.Array, jax.Array]:
    if isinstance(sample, Mapping):
        return jnp.asarray(sample["q"]), jnp.asarray(sample["k"])
    q, k = sample[:2]
    return jnp.asarray(q), jnp.asarray(k)


def _counts_at(curves: np.ndarray, level: float) -> np.ndarray:
    """Smallest count (1-based) per row of ``curves`` [..., Nk] whose recall reaches ``level``."""
    reached = curves >= level - 1e-6
    return np.where(reached.any(-1), np.argmax(reached, axis=-1) + 1, curves.shape[-1])


def _row_limits(config: BAConfig, length_q: int, length_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(allowed, forced) int [Nq]: per query block, the key blocks the mask allows and those forced in."""
    allowed = np.asarray(config.mask.block_pairs(length_q, length_k, config.block_q, config.block_k)[0])
    forced = forced_blocks(config, length_q=length_q, length_k=length_k, k_perm=None, q_heads=1)
    n_allowed = allowed.sum(-1)
    n_forced = np.zeros_like(n_allowed) if forced is None else (np.asarray(forced)[0, 0] & allowed).sum(-1)
    return n_allowed, n_forced


def _kept_share(counts, n_allowed: np.ndarray, n_forced: np.ndarray) -> float:
    c = np.asarray(counts, np.int64)[..., None]
    kept = np.minimum(np.maximum(c, n_forced), n_allowed).sum(-1)  # [..., ] per head
    return float(np.mean(kept / max(int(n_allowed.sum()), 1)))


def kept_share(counts: np.ndarray, config: BAConfig, *, length_q: int, length_k: int) -> float:
    """The share of the allowed block pairs that ``counts`` (per head, any leading shape) keep under
    ``config`` at these lengths: per query block, the count or the forced blocks (sink, local window,
    causal diagonal) whichever is more, never more than the blocks the mask allows. With every block
    allowed and none forced beyond the count, the mean count over Nk."""
    return _kept_share(counts, *_row_limits(config, length_q, length_k))


def calibrate_budgets(samples: Mapping[int, object] | Sequence[object], config: BAConfig, *,
                      target_recall: float | None = None, target_density: float | None = None,
                      selector: str | None = None) -> Budgets:
    """Per-(layer, head) counts from Q/K samples (see the module docstring).

    samples: {layer: {"q": q, "k": k}} (``capture_qkv``'s output) or {layer: (q, k)}, or a
      sequence of those values for layers 0, 1, ...; q [B, L, Hq, D], k [B, L, Hkv, D].
    target_recall: per head, the smallest count whose oracle recall reaches it.
    target_density: the kept share of the allowed block pairs, over every layer and head, to spend
      (``kept_share``: forced blocks and the mask count): heads get the counts of one common recall
      level, the highest whose kept share fits the density.
    selector: the selector whose ranking is calibrated (default ``config.selector``).
    Give exactly one target. All layers must share the length (and so Nk).
    """
    if (target_recall is None) == (target_density is None):
        raise ValueError("give exactly one of target_recall and target_density")
    for name, value in (("target_recall", target_recall), ("target_density", target_density)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
            raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    config = config if selector is None else config.replace(selector=selector)
    items = dict(samples) if isinstance(samples, Mapping) else dict(enumerate(samples))
    if not items:
        raise ValueError("samples must hold at least one layer")
    curves, lengths = {}, set()
    for layer, sample in sorted(items.items()):
        q, k = _qk(sample)
        lengths.add((q.shape[1], k.shape[1]))
        curves[layer] = np.asarray(recall_curves(q, k, config))
    if len(lengths) != 1:
        raise ValueError(f"samples must share one query and key length; got {sorted(lengths)}")
    (length_q, length_k), = lengths
    layers = tuple(sorted(curves))
    stacked = np.stack([curves[layer] for layer in layers])  # [layers, Hq, Nk]
    nk = stacked.shape[-1]
    if target_recall is not None:
        counts, target = _counts_at(stacked, target_recall), f"recall={target_recall}"
    else:
        limits = _row_limits(config, length_q, length_k)
        share = lambda counts: _kept_share(counts, *limits)  # noqa: E731
        levels = np.unique(stacked)  # every recall a count reaches: bisect for the highest that fits
        lo, hi = 0, len(levels) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if share(_counts_at(stacked, levels[mid])) <= target_density + 1e-9:
                lo = mid
            else:
                hi = mid - 1
        counts, target = _counts_at(stacked, levels[lo]), f"density={target_density}"
    recall = np.take_along_axis(stacked, (counts - 1)[..., None], axis=-1)[..., 0]
    return Budgets(layers=tuple(int(x) for x in layers), counts=tuple(tuple(int(c) for c in row) for row in counts),
                   num_k_blocks=int(nk), recall=tuple(tuple(round(float(r), 6) for r in row) for row in recall),
                   block_q=config.block_q, block_k=config.block_k, selector=config.selector, target=target)

