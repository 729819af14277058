"""BA-Att across devices: head parallelism and context (sequence) parallelism with ``jax.shard_map``.

Two ways to split one attention call over a ``jax.sharding.Mesh`` (docs/sharding.md):

- ``mode="heads"``: batch rows and heads are split over mesh axes. Every (batch row, head) is
  independent in BA-Att (its own sort, statistics, selection and sparse operator), so each
  device runs ``baatt.attention`` on its shard and nothing is communicated.
- ``mode="context"``: queries and keys are split along the sequence (contiguous shards of whole
  blocks). Each device computes the block statistics of its own keys; only those are
  all-gathered (a float32 mean, and a variance with compensation, per block: 1/64 of bf16 K at
  128-token blocks), so that every device selects key blocks for its query blocks over the
  whole sequence, exactly as one device would (norm sorting and clustering stay within a
  shard). Then each device needs the key/value blocks it selected: ``kv_exchange="all_gather"``
  gathers every K/V shard at once; ``"ring"`` passes the K/V shards round the devices
  (``ppermute``), attends to the selected blocks of each shard as it arrives (shards that no
  local query block selected are skipped) and merges the partial results by their
  log-sum-exp; the ring stops early when no device needs shards from farther away.

Both modes call ``baatt.attention`` per shard, so every registered implementation (the Mosaic GPU
and Pallas kernels, the reference) runs unchanged inside ``shard_map``; gradients flow through the
collectives (an all-gather's transpose is a reduce-scatter, a ppermute's is the reverse one).

``register_head_parallel`` puts head parallelism behind ``baatt.attention``'s registry, so code
that only names an implementation (``baatt.nn.AttentionPlan(implementation=...)``: the DLM)
runs head- and data-parallel without changes. ``collectives`` reads the communication of a
compiled program from its HLO text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from baatt import api, layout
from baatt.config import BAConfig
from baatt.kernels import BACKENDS
from baatt.kernels.base import Implementation
from baatt.selection import get_selector
from baatt.selection.budget import forced_blocks, select_from_scores
from baatt.selection.estimator import BlockStats, estimate, pooled_scores
from baatt.selection.types import BlockSelection
from baatt.validation import check_finite, check_qkv, nan_where

MODES = ("heads", "context")
KV_EXCHANGES = ("all_gather", "ring")
# Selectors whose scores come from per-block statistics alone, hence can be computed from
# gathered statistics in context mode; the others read every key (oracle, xattention, ...).
CONTEXT_SELECTORS = ("baatt", "meanpool")

AxisNames = str | tuple[str, ...] | None


# ----------------------------------------------------------------------------- mesh axes


def _axis_tuple(axes: AxisNames) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def axis_size(mesh: Mesh, axes: AxisNames) -> int:
    """Number of shards along ``axes`` (a mesh axis name, a tuple of them, or None: 1)."""
    return math.prod(mesh.shape[a] for a in _axis_tuple(axes))


def _check_axes(mesh: Mesh, **axes: AxisNames) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    used: dict[str, str] = {}
    for arg, names in axes.items():
        if names is not None and not isinstance(names, (str, tuple)):
            raise ValueError(f"{arg} must be a mesh axis name, a tuple of them or None; got {names!r}")
        for name in _axis_tuple(names):
            if name not in mesh.axis_names:
                raise ValueError(f"{arg} must name axes of the mesh {mesh.axis_names}; got {name!r}")
            if name in used:
                raise ValueError(f"{arg} and {used[name]} both use mesh axis {name!r}; each axis splits one dimension")
            used[name] = arg


def _check_divides(what: str, size: int, shards: int, axis_arg: str, axes: AxisNames) -> None:
    if size % shards:
        raise ValueError(f"{what} ({size}) must be divisible by the {shards} shards of {axis_arg}={axes!r}")


def _place(mesh: Mesh, x, spec: P):
    """``x`` resharded to ``spec`` on an Explicit mesh (shard_map does not reshard there); unchanged
    on an Auto mesh, where shard_map inserts the resharding itself."""
    if x is None or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _static_fields(selection: BlockSelection) -> dict:
    """The static fields of a selection (block sizes, mask): what rebuilds it from its arrays."""
    return {f.name: getattr(selection, f.name) for f in dataclasses.fields(selection) if f.metadata.get("static")}


def _attention_call(implementation, interpret: bool, scale: float | None, chosen: list[str]):
    """``baatt.attention`` with stats, recording which implementation ran (a name cannot leave shard_map)."""

    def call(q, k, v, key_mask, selection, config):
        out, stats = api.attention(q, k, v, config=config, key_mask=key_mask, selection=selection,
                                   implementation=implementation, interpret=interpret, scale=scale,
                                   return_stats=True)
        chosen.append(stats["implementation"])
        return out, stats["lse"], stats["selection"]

    return call


# ----------------------------------------------------------------------------- entry point


def sharded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    mode: Literal["heads", "context"],
    config: BAConfig | None = None,
    key_mask: jax.Array | None = None,
    batch_axis: AxisNames = None,
    head_axis: AxisNames = None,
    context_axis: str | None = None,
    kv_exchange: Literal["all_gather", "ring"] | None = None,
    selection: BlockSelection | None = None,
    implementation: str | Sequence[str] | None = None,
    return_stats: bool = False,
    interpret: bool = False,
    scale: float | None = None,
):
    """``baatt.attention`` split over the devices of ``mesh``; works inside and outside ``jax.jit``.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (Hkv divides Hq), global arrays in any sharding:
        they are brought to the layout of ``mode`` (on an Explicit mesh by ``jax.sharding.reshard``).
      mesh: the devices and their named axes.
      mode: "heads" (split batch rows and heads; no communication) or "context" (split the
        sequence; gathers block statistics, then K/V as ``kv_exchange`` says).
      config, key_mask, implementation, interpret, scale: as ``baatt.attention``; they apply per shard.
      batch_axis: mesh axis (or axes) splitting the batch; None: not split.
      head_axis: mesh axis (or axes) splitting the heads (mode "heads": default "heads"). Key/value
        heads are split with their query heads, so its size must divide Hkv.
      context_axis: mesh axis splitting the sequence (mode "context" only; default "context").
        Each shard must hold whole blocks: Lq a multiple of shards x block_q, Lk of shards x block_k.
      kv_exchange: mode "context" only: "all_gather" (default) or "ring" (docs/sharding.md compares them).
      selection: reuse a selection (``stats["selection"]`` of an earlier call on the same mesh and
        mode) instead of estimating one. In mode "context" its permutations must stay within shards,
        as those this function makes do.
      return_stats: also return ``baatt.AttentionStats`` of the whole call (selection and lse are
        global arrays, sharded like the inputs).

    Returns:
      out [B, Lq, Hq, D] (sharded like q), or (out, stats).

    Mode "heads" runs every configuration of ``baatt.attention`` (causal masks, the guard, the
    pooled tail included): each device holds whole sequences. Mode "context" selects with the
    BA-Att estimator over gathered statistics: the selector must be one of ``CONTEXT_SELECTORS``,
    the mask bidirectional and ``guard_recall`` None (both need positions or keys of other
    shards), and ``tail="pooled"`` needs ``kv_exchange="all_gather"``. Norm sorting and
    clustering (``sort_*``, ``cluster_*``) order tokens within each shard (a global order would
    move every token across devices), so with them the selection differs from one device's.
    """
    config = BAConfig() if config is None else config
    if not isinstance(config, BAConfig):
        raise ValueError(f"config must be a baatt.BAConfig; got {type(config).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode == "heads":
        head_axis = "heads" if head_axis is None else head_axis
        if context_axis is not None or kv_exchange is not None:
            raise ValueError("context_axis and kv_exchange apply to mode='context' only; got "
                             f"context_axis={context_axis!r}, kv_exchange={kv_exchange!r}")
    else:
        context_axis = "context" if context_axis is None else context_axis
        kv_exchange = "all_gather" if kv_exchange is None else kv_exchange
        if not isinstance(context_axis, str):
            raise ValueError(f"context_axis must be one mesh axis name; got {context_axis!r}")
        if kv_exchange not in KV_EXCHANGES:
            raise ValueError(f"kv_exchange must be one of {KV_EXCHANGES}; got {kv_exchange!r}")
    _check_axes(mesh, batch_axis=batch_axis, head_axis=head_axis, context_axis=context_axis)
    check_qkv(q, k, v, key_mask=key_mask, require_real_key=False)
    check_finite(q=q, k=k, v=v, key_mask=key_mask)
    _check_divides("the batch size", q.shape[0], axis_size(mesh, batch_axis), "batch_axis", batch_axis)
    _check_divides("the number of kv heads", k.shape[2], axis_size(mesh, head_axis), "head_axis", head_axis)
    if selection is not None:
        if not isinstance(selection, BlockSelection):
            raise ValueError(f"selection must be a baatt.BlockSelection; got {type(selection).__name__}")
        selection.validate(batch=q.shape[0], q_heads=q.shape[2], kv_heads=k.shape[2],
                           length_q=q.shape[1], length_k=k.shape[1])
    # The static fields (block sizes, mask) of the selection made or given, for rebuilding it from its arrays.
    statics = _static_fields(selection) if selection is not None else dict(
        block_q=config.block_q, block_k=config.block_k, mask=config.mask)
    block_q, block_k = statics["block_q"], statics["block_k"]
    if mode == "context":
        _check_context_config(config, statics["mask"], kv_exchange, selection_given=selection is not None)
        shards = mesh.shape[context_axis]
        for name, length, block in (("q", q.shape[1], block_q), ("k", k.shape[1], block_k)):
            if length % (shards * block):
                raise ValueError(
                    f"in mode='context' the length of {name} ({length}) must be a multiple of the {shards} "
                    f"shards of context_axis={context_axis!r} times the block size ({block}): each shard "
                    "holds whole blocks (pad with key_mask=False to reach one)")

    chosen: list[str] = []
    call = _attention_call(implementation, interpret, scale, chosen)
    b, h, c = batch_axis, head_axis, context_axis  # c is None in mode "heads": no split along length
    if mode == "heads":
        body = functools.partial(_head_parallel_body, call=call, config=config, statics=statics)
    else:
        body = functools.partial(_context_parallel_body, call=call, config=config, statics=statics, axis=c,
                                 shards=mesh.shape[c], kv_exchange=kv_exchange)
    tokens = P(b, c, h, None)  # q, k, v and out [B, L, H, D]
    # indices, counts, q_perm; k_perm whole on every device of a context group (within-shard sorts,
    # global positions), as the selection needs it.
    sel_specs = (P(b, h, c, None), P(b, h, c), P(b, h, c), P(b, h, None))
    sel_parts = (None,) * 4 if selection is None else (
        selection.indices, selection.counts, selection.q_perm, selection.k_perm)
    specs = (tokens, tokens, tokens, P(b, c)) + sel_specs
    args = tuple(_place(mesh, x, spec) for x, spec in zip((q, k, v, key_mask) + sel_parts, specs))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tokens, P(b, h, c)) + sel_specs,
                           check_vma=False)
    out, lse, indices, counts, q_perm, k_perm = mapped(*args)
    if not return_stats:
        return out
    sel = BlockSelection(indices, counts, q_perm, k_perm, **statics)
    nk = -(-k.shape[1] // block_k)
    stats = api.AttentionStats(implementation=chosen[0], density=sel.density(nk), selection=sel, lse=lse)
    return out, stats


# ----------------------------------------------------------------------------- mode "heads"


def _head_parallel_body(q, k, v, key_mask, indices, counts, q_perm, k_perm, *, call, config, statics):
    selection = None if indices is None else BlockSelection(indices, counts, q_perm, k_perm, **statics)
    out, lse, sel = call(q, k, v, key_mask, selection, config)
    return out, lse, sel.indices, sel.counts, sel.q_perm, sel.k_perm


# ----------------------------------------------------------------------------- mode "context"


def _check_context_config(config: BAConfig, mask, kv_exchange: str, *, selection_given: bool) -> None:
    """What mode "context" does not split across the sequence, refused by name."""
    if not mask.is_bidirectional:
        raise ValueError(f"in mode='context' the mask must be bidirectional (a causal mask's block pairs and "
                         f"diagonal depend on global positions; mode='heads' runs it); got {mask.describe()}")
    if config.guard_recall is not None:
        raise ValueError("in mode='context' config.guard_recall must be None: the guard's exact softmax of a "
                         f"sampled query block needs every key (mode='heads' runs it); got {config.guard_recall!r}")
    if config.tail != "none" and kv_exchange == "ring":
        raise ValueError(f"config.tail={config.tail!r} needs kv_exchange='all_gather' in mode='context': the pooled "
                         "tail of the dropped blocks needs every key at once")
    if not selection_given and config.selector not in CONTEXT_SELECTORS:
        raise ValueError(
            f"in mode='context' config.selector must be one of {CONTEXT_SELECTORS} (selectors whose scores "
            f"come from block statistics, which are all that is gathered); got {config.selector!r}. "
            "Pass a selection made otherwise through selection=")


def _context_parallel_body(q, k, v, key_mask, indices, counts, q_perm, k_perm, *, call, config, statics, axis,
                           shards, kv_exchange):
    """One device's part: its query blocks attend over the whole sequence's keys."""
    shard = lax.axis_index(axis)
    q_offset = shard * q.shape[1]
    gather = functools.partial(lax.all_gather, axis_name=axis, tiled=True)
    if indices is None:
        indices, counts, q_perm, k_perm = _select_over_context(q, k, key_mask, config, shard=shard, shards=shards,
                                                               gather=gather)
    elif q_perm is not None:
        q_perm = q_perm - q_offset  # positions within this shard
    # The key mask: one byte per token, against the head_dim x kv_heads elements of a key.
    key_mask_all = None if key_mask is None else gather(key_mask, axis=1)
    parts = dict(q=q, k=k, v=v, key_mask_all=key_mask_all, indices=indices, counts=counts, q_perm=q_perm,
                 k_perm=k_perm, config=config, block_q=statics["block_q"], block_k=statics["block_k"], call=call)
    if kv_exchange == "all_gather":
        out, lse = _attend_all_gathered(**parts, gather=gather)
    else:
        out, lse = _attend_ring(**parts, axis=axis, shard=shard, shards=shards)
    q_perm = None if q_perm is None else q_perm + q_offset
    return out, lse, indices, counts, q_perm, k_perm


def _select_over_context(q, k, key_mask, config: BAConfig, *, shard, shards, gather):
    """The BA-Att selection of the local query blocks over every key block of the sequence.

    Sorting and block statistics are local (within the shard); only the key statistics, and the key
    permutations when keys are sorted, are gathered. Returns indices and counts of the local query
    blocks (global key-block ids), the local q_perm (positions within the shard) and the gathered
    k_perm (global positions; each shard's sort stays inside the shard).
    """
    if config.selector == "meanpool":  # mean pooling is BA-Att without its sorts and compensation (selection.meanpool)
        config = config.replace(sort_q=False, sort_k=False, compensate=False)
    est = estimate(q, k, config, key_mask=key_mask)
    ks = est.k_stats  # [B, Hkv, Nk_local, D]: a mean (and a variance) per block, gathered along the blocks
    k_stats = BlockStats(gather(ks.mean, axis=2), None if ks.var is None else gather(ks.var, axis=2),
                         gather(ks.count, axis=2))
    scores = pooled_scores(est.q_stats, k_stats, config, q.shape[-1])  # [B, Hq, Nq_local, Nk]
    k_perm = None if est.k_perm is None else gather(est.k_perm + shard * k.shape[1], axis=2)
    forced = forced_blocks(config, length_q=q.shape[1] * shards, length_k=k.shape[1] * shards, k_perm=k_perm,
                           q_heads=q.shape[2])
    if forced is not None:  # the rows of this shard's query blocks
        local_blocks = scores.shape[2]
        forced = lax.dynamic_slice_in_dim(forced, shard * local_blocks, local_blocks, axis=2)
    sel = select_from_scores(scores, config, forced=forced, q_perm=est.q_perm, length_q=q.shape[1] * shards,
                             length_k=k.shape[1] * shards)
    return sel.indices, sel.counts, est.q_perm, k_perm


def _attend_all_gathered(*, q, k, v, key_mask_all, indices, counts, q_perm, k_perm, config, block_q, block_k, call,
                         gather):
    k_all, v_all = gather(k, axis=1), gather(v, axis=1)
    selection = BlockSelection(indices, counts, q_perm, k_perm, block_q, block_k)
    out, lse, _ = call(q, k_all, v_all, key_mask_all, selection, config)
    return out, lse


def _selection_in_shard(indices, counts, shard, blocks_per_shard: int):
    """The kept key blocks that lie in key shard ``shard``, as ids within it.

    Returns (ids [..., min(kmax, blocks_per_shard)], counts clamped to >= 1, has [...] whether the
    row keeps any block there). A row that keeps none gets one arbitrary block (an operator needs
    one); its result must be discarded (``has`` False).
    """
    kmax = indices.shape[-1]
    live = jnp.arange(kmax) < counts[..., None]
    first = shard * blocks_per_shard
    inside = live & (indices >= first) & (indices < first + blocks_per_shard)
    n_inside = jnp.sum(inside, axis=-1, dtype=jnp.int32)
    start = jnp.sum(live & (indices < first), axis=-1, dtype=jnp.int32)  # kept ids ascend: a contiguous run
    width = min(kmax, blocks_per_shard)
    slot = jnp.arange(width)
    ids = jnp.take_along_axis(indices, jnp.minimum(start[..., None] + slot, kmax - 1), axis=-1) - first
    last = jnp.take_along_axis(ids, jnp.maximum(n_inside - 1, 0)[..., None], axis=-1)
    ids = jnp.clip(jnp.where(slot < n_inside[..., None], ids, last), 0, blocks_per_shard - 1)
    return ids.astype(jnp.int32), jnp.maximum(n_inside, 1), n_inside > 0


def _merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over two disjoint key sets from each one's (out [B, L, H, D], lse [B, H, L]).

    Rows with no key in a set carry lse -inf there; written so that neither values nor gradients
    see inf - inf. A NaN (a poisoned row) carries through.
    """
    top = jnp.maximum(lse_a, lse_b)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    empty = jnp.isneginf
    weight = lambda lse: jnp.where(empty(lse), 0.0, jnp.exp(jnp.where(empty(lse), 0.0, lse) - top))
    wa, wb = weight(lse_a), weight(lse_b)
    total = wa + wb
    lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    safe = jnp.where(total > 0, total, 1.0)
    to_rows = lambda w: jnp.swapaxes(w / safe, 1, 2)[..., None]  # [B, H, L] -> [B, L, H, 1]
    out = out_a.astype(jnp.float32) * to_rows(wa) + out_b.astype(jnp.float32) * to_rows(wb)
    return out, lse


def _attend_ring(*, q, k, v, key_mask_all, indices, counts, q_perm, k_perm, config, block_q, block_k, call, axis,
                 shard, shards):
    """Attention of the local queries as the K/V shards come round the ring.

    At step t this device holds key shard (shard - t) mod shards; it attends to the blocks of that
    shard its query blocks kept (a shard none kept is skipped), merges the partial result by
    log-sum-exp, and passes the shard on. Transfers stop after the farthest hop any device needs.
    """
    length_k = k.shape[1]
    per_shard = length_k // block_k
    owner = indices // per_shard  # the key shard of each kept block
    live = jnp.arange(indices.shape[-1]) < counts[..., None]
    hop = jnp.where(live, (shard - owner) % shards, 0)
    hops_needed = lax.pmax(jnp.max(hop), axis)
    # Row validity of each query block's result in positional order (lse is positional; blocks may be sorted).
    inverse = None if q_perm is None else layout.invert_permutation(q_perm)

    def rows(has_block):
        has = jnp.repeat(has_block, block_q, axis=-1)  # [B, Hq, Lq_local] in block (possibly sorted) order
        return has if inverse is None else jnp.take_along_axis(has, inverse, axis=-1)

    out_shape, lse_shape = q.shape[:3] + (v.shape[-1],), (q.shape[0], q.shape[2], q.shape[1])
    out, lse = jnp.zeros(out_shape, jnp.float32), jnp.full(lse_shape, -jnp.inf, jnp.float32)
    to_next = [(i, (i + 1) % shards) for i in range(shards)]
    kv = (k, v)
    for step in range(shards):
        held = (shard - step) % shards
        ids, n_kept, has = _selection_in_shard(indices, counts, held, per_shard)
        key_mask = None if key_mask_all is None else lax.dynamic_slice_in_dim(key_mask_all, held * length_k,
                                                                                length_k, axis=1)
        perm = None if k_perm is None else (
            lax.dynamic_slice_in_dim(k_perm, held * length_k, length_k, axis=2) - held * length_k)
        selection = BlockSelection(ids, n_kept, q_perm, perm, block_q, block_k)

        def attend(kv, key_mask, selection):
            out, lse, _ = call(q, kv[0], kv[1], key_mask, selection, config)
            return out, lse

        def skip(kv, key_mask, selection):
            return jnp.zeros(out_shape, q.dtype), jnp.full(lse_shape, -jnp.inf, jnp.float32)

        part_out, part_lse = lax.cond(jnp.any(has), attend, skip, kv, key_mask, selection)
        # Rows that kept nothing in this shard ran on a stand-in block: drop them (weight 0 in the merge).
        out, lse = _merge_partials(out, lse, part_out, jnp.where(rows(has), part_lse, -jnp.inf))
        if step + 1 < shards:
            kv = lax.cond(step + 1 <= hops_needed, lambda kv: lax.ppermute(kv, axis, to_next), lambda kv: kv, kv)
    rows_poison, columns_poison = _nonfinite_poison_over_context(q, k, v, key_mask_all, shard=shard, axis=axis)
    out = out + rows_poison[..., None] + columns_poison
    return out.astype(q.dtype), lse + jnp.swapaxes(rows_poison, 1, 2)


def _nonfinite_poison_over_context(q, k, v, key_mask_all, *, shard, axis):
    """``baatt.attention``'s rule for NaN/Inf inputs (``baatt.validation.nonfinite_poison``, bidirectional)
    over the whole sequence: a bad query row poisons its own row; a bad real key every row of the query
    heads its kv head serves; a bad real value those heads' output dims where it holds it. The ring's
    calls see only the shards it brings, so each device reduces its own keys and values to one flag per
    (batch row, kv head[, dim]) and the flags are combined over the context axis: a few bytes.

    Returns rows [B, Lq, Hq] and columns [B, 1, Hq, Dv], float32, NaN where poisoned, else 0.
    """
    real = None if key_mask_all is None else lax.dynamic_slice_in_dim(
        key_mask_all, shard * k.shape[1], k.shape[1], axis=1)[:, :, None, None]
    bad = lambda x: ~jnp.isfinite(x) if real is None else ~jnp.isfinite(x) & real
    bad_k = lax.pmax(jnp.any(bad(k), axis=(1, 3)).astype(jnp.int32), axis) > 0  # [B, Hkv]
    bad_v = lax.pmax(jnp.any(bad(v), axis=1).astype(jnp.int32), axis) > 0  # [B, Hkv, Dv]
    heads = layout.head_map(q.shape[2], k.shape[2])
    bad_rows = ~jnp.all(jnp.isfinite(q), axis=-1) | jnp.take(bad_k, heads, axis=1)[:, None, :]
    return nan_where(bad_rows), nan_where(jnp.take(bad_v, heads, axis=1))[:, None]


# ----------------------------------------------------------------------------- through the registry


def register_head_parallel(mesh: Mesh, *, head_axis: AxisNames = "heads", batch_axis: AxisNames = None,
                           implementation: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Register head-parallel versions of implementations of ``baatt.attention``; returns their names.

    Each registered implementation runs the estimator and the sparse operator of a built-in one
    (``baatt.kernels.BACKENDS`` or the reference) inside ``jax.shard_map`` over ``mesh``, batch rows
    split over ``batch_axis`` and heads over ``head_axis``. Pass the returned names as
    ``implementation=`` (to ``baatt.attention`` or ``baatt.nn.AttentionPlan``): the first that can
    run the per-shard shapes is picked, as for any sequence of names. They have priority -1, so
    ``implementation=None`` never picks them.

    ``baatt.attention`` runs its own steps between the two stages (layout changes, the NaN rules,
    the guard and the pooled tail when configured) outside them, and the compiler partitions
    those. Without norm sorting or clustering the layout change is a transpose and stays local;
    what crosses devices is the NaN rules' bookkeeping, a few values per (batch row, head),
    whatever the length. With ``sort_*`` / ``cluster_*`` the permutation gathers are partitioned
    with collectives (correct, but sequence-sized data moves). ``sharded_attention(mode="heads")``
    runs the whole call per shard and communicates nothing in every configuration.

    implementation: which built-in implementations to wrap (a name or names); default all of them,
    in priority order.
    """
    _check_axes(mesh, batch_axis=batch_axis, head_axis=head_axis)
    built_in = {impl.name: impl for impl in (*BACKENDS, api.REFERENCE_IMPLEMENTATION)}
    if implementation is None:
        names = tuple(sorted(built_in, key=lambda n: -built_in[n].priority))
    else:
        names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    for name in names:
        if name not in built_in:
            raise ValueError(f"implementation must name built-in implementations {tuple(built_in)}; got {name!r}")
    registered = []
    for name in names:
        wrapped = _head_parallel_implementation(built_in[name], mesh, batch_axis, head_axis)
        api.register_implementation(wrapped)
        registered.append(wrapped.name)
    return tuple(registered)


def _mesh_label(mesh: Mesh) -> str:
    shape = ",".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh({shape}) devices {[d.id for d in mesh.devices.flat]}"


def _head_parallel_implementation(inner: Implementation, mesh: Mesh, batch_axis: AxisNames,
                                  head_axis: AxisNames) -> Implementation:
    b, h = batch_axis, head_axis
    n_batch, n_heads = axis_size(mesh, b), axis_size(mesh, h)
    rows4, rows3, rows2 = P(b, h, None, None), P(b, h, None), P(b, None)  # head-major arrays and q_valid
    positional = P(b, None, h, None)  # [B, L, H, D]
    shard_map = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

    def why_unavailable(q, k, v, config, interpret):
        if q.shape[0] % n_batch:
            return f"the batch size ({q.shape[0]}) is not divisible by the {n_batch} shards of {b!r}"
        if k.shape[2] % n_heads:
            return f"the number of kv heads ({k.shape[2]}) is not divisible by the {n_heads} shards of {h!r}"
        local = lambda x: jax.ShapeDtypeStruct((x.shape[0] // n_batch, x.shape[1], x.shape[2] // n_heads,
                                                x.shape[3]), x.dtype)
        return inner.why_unavailable(local(q), local(k), local(v), config, interpret)

    def estimator(q, k, config, *, key_mask=None, interpret=False):
        statics = []  # block sizes and mask of the selection made per shard (static, so not an output)

        def body(q, k, key_mask):
            if inner.estimator is not None:
                sel = inner.estimator(q, k, config, key_mask=key_mask, interpret=interpret)
            else:
                sel = get_selector(config.selector).select(q, k, config, key_mask=key_mask)
            statics.append(_static_fields(sel))
            return sel.indices, sel.counts, sel.q_perm, sel.k_perm

        parts = shard_map(body, in_specs=(positional, positional, rows2),
                          out_specs=(rows4, rows3, rows3, rows3))(q, k, key_mask)
        return BlockSelection(*parts, **statics[0])

    def sparse_op(space, indices, counts, *, scale, interpret=False):
        def body(q, k, v, kv_valid, q_valid, indices, counts):
            local = dataclasses.replace(space, q=q, k=k, v=v, kv_valid=kv_valid, q_valid=q_valid)
            return inner.sparse_op(local, indices, counts, scale=scale, interpret=interpret)

        return shard_map(body, in_specs=(rows4, rows4, rows4, rows3, rows2, rows4, rows3),
                         out_specs=(rows4, rows3))(space.q, space.k, space.v, space.kv_valid, space.q_valid,
                                                   indices, counts)

    positional_op = None
    if inner.positional_op is not None:
        def positional_op(q, k, v, indices, counts, *, scale, block_q, block_k, mask):
            body = functools.partial(inner.positional_op, scale=scale, block_q=block_q, block_k=block_k, mask=mask)
            return shard_map(body, in_specs=(positional, positional, positional, rows4, rows3),
                             out_specs=(positional, rows3))(q, k, v, indices, counts)

    axes = ", ".join(f"{what} over {names!r}" for what, names in (("batch", b), ("heads", h)) if names is not None)
    return Implementation(
        name=f"{inner.name}[{axes}; {_mesh_label(mesh)}]",
        priority=-1,
        why_unavailable=why_unavailable,
        sparse_op=sparse_op,
        reference=inner.reference,
        estimator=estimator,
        positional_op=positional_op,
    )


# ----------------------------------------------------------------------------- communication in HLO

_COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>" + "|".join(_COLLECTIVE_OPS) + r")(?P<start>-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+[a-z0-9]*)\[(?P<dims>[\d,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<used>[^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]<=")


def _dtype_bytes(dtype: str) -> int:
    if dtype == "pred":
        return 1
    bits = int(re.search(r"\d+", dtype).group())
    return max(1, bits // 8)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program (``collectives``).

    kind: "all-gather", "all-reduce", "reduce-scatter", "collective-permute" or "all-to-all".
    arrays: (dtype, shape) of each array it produces on one device.
    group_size: devices taking part in each group (None where the HLO does not say).
    """

    kind: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int | None

    @property
    def result_bytes(self) -> int:
        """Bytes of the arrays it produces on one device."""
        return sum(_dtype_bytes(dt) * math.prod(shape) for dt, shape in self.arrays)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the whole array exchanged: the gathered, reduced or sent array (for a
        reduce-scatter, the array before scattering)."""
        if self.kind == "reduce-scatter":
            return self.result_bytes * (self.group_size or 1)
        return self.result_bytes

    @property
    def received_bytes(self) -> float:
        """Bytes one device receives under the usual algorithms: (g-1)/g of the payload for a
        gather, scatter or all-to-all, twice that for an all-reduce (reduce-scatter + all-gather),
        the whole payload for a permute."""
        if self.kind == "collective-permute":
            return float(self.payload_bytes)
        g = self.group_size or 1
        share = (g - 1) / g * self.payload_bytes
        return 2 * share if self.kind == "all-reduce" else share


def _group_size(rest: str) -> int | None:
    if m := _MESH_GROUPS.search(rest):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group("axes")))
        used = re.findall(r"'([^']+)'", m.group("used"))
        return math.prod(int(sizes[a]) for a in used)
    if m := _LIST_GROUPS.search(rest):
        return len([x for x in m.group("first").split(",") if x])
    if m := _IOTA_GROUPS.search(rest):
        return int(m.group("size"))
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled program, from ``jax.jit(f).lower(...).compile().as_text()``.

    Asynchronous pairs count once, at their ``-start`` (whose result tuple lists the operands
    first, then the results, then any scalar context, which is left out).
    """
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if m is None:
            continue
        arrays = [(a["dtype"], tuple(int(d) for d in a["dims"].split(",") if d)) for a in _ARRAY.finditer(m["type"])]
        if m["start"] and m["op"] != "all-reduce":
            arrays = [a for a in arrays if a[1]]  # drop the scalar context of a collective-permute-start
            arrays = arrays[len(arrays) // 2:]  # (operands..., results...)
        found.append(Collective(m["op"], tuple(arrays), _group_size(m["rest"])))
    return found
