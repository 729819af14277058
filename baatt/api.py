"""``baatt.attention``: the public entry point and the registry of implementations.

One dispatcher. The registry holds the kernel backends (``baatt.kernels.BACKENDS``)
and the plain-JAX reference; ``register_implementation`` adds a user's. An
implementation (``baatt.Implementation``) supplies the block-sparse operator in
block space (``layout.BlockSpace`` + selection -> out, lse) and may replace the
estimator or run on the caller's layout. ``implementation=None`` picks the first
available in priority order and says which in the stats; an explicitly requested
implementation that cannot run raises ``ImplementationUnavailable`` with the
reasons, never falls back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Literal, overload

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from baatt import layout
from baatt.attention_mask import with_is_causal
from baatt.config import BAConfig
from baatt.kernels import BACKENDS, mosaic_gpu, pallas_triton
from baatt.kernels.base import Implementation
from baatt.reference.attention import block_sparse_blocked
from baatt.reference.tail import add_pooled_tail
from baatt.selection import SELECTORS, get_selector
from baatt.selection.calibrate import head_counts_from_budget, select_with_budget
from baatt.selection.guard import GuardReport, guard_selection
from baatt.selection.types import BlockSelection
from baatt.validation import (
    FLOAT_DTYPES,
    check_finite,
    check_qkv,
    check_scale,
    check_sink_positions,
    debug_check_finite,
    is_concrete,
    nan_where,
    nonfinite_poison,
)


class ImplementationUnavailable(NotImplementedError):
    """No implementation that was tried can run these inputs here.

    ``reasons`` maps each implementation tried, in order, to every reason it gave
    (its ``why_unavailable``).
    """

    def __init__(self, reasons: dict[str, str], *, explicit: bool):
        self.reasons = reasons
        what = "requested implementation(s) cannot run" if explicit else "no implementation can run"
        super().__init__(f"{what}: " + "; ".join(f"{name}: {why}" for name, why in reasons.items()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionStats:
    """What ``attention(..., return_stats=True)`` returns beside the output.

    A pytree whose leaves are the arrays and whose ``implementation`` is static
    metadata, so that stats leave ``jax.jit`` and pass through ``vmap`` and ``scan``
    like the output. Fields read as attributes or by name (``stats["density"]``).

    Attributes:
      implementation: the name of the implementation that ran.
      density: [B, Hq], the fraction of block pairs computed.
      selection: the ``BlockSelection`` used (reusable through ``attention(selection=...)``).
      lse: [B, Hq, Lq], the log-sum-exp of each row (-inf for a row that sees no key,
        NaN where the output row is NaN); with ``config.tail``, of the kept keys and the
        pooled estimate of the dropped ones together.
      guard: with ``config.guard_recall``, the ``GuardReport`` of the accuracy guard (each
        head's sampled recall, which heads it densified, its cost); None otherwise.
    """

    implementation: str = dataclasses.field(metadata=dict(static=True))
    density: jax.Array
    selection: BlockSelection
    lse: jax.Array
    guard: GuardReport | None = None

    def __getitem__(self, name: str):
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(f"AttentionStats has no field {name!r}")
        return getattr(self, name)


def _reference_sparse_op(space, indices, counts, *, scale, interpret=False):
    del interpret  # plain JAX: the same code everywhere
    return block_sparse_blocked(space, indices, counts, scale=scale)


REFERENCE_IMPLEMENTATION = Implementation(
    name="reference",
    priority=0,
    why_unavailable=lambda q, k, v, config, interpret: None,
    sparse_op=_reference_sparse_op,
    reference="baatt.reference.attention.block_sparse_blocked",
)

_REGISTRY: dict[str, Implementation] = {impl.name: impl for impl in (*BACKENDS, REFERENCE_IMPLEMENTATION)}


def register_implementation(impl: Implementation) -> None:
    """Add an implementation of ``attention`` (or replace the one of the same name)."""
    if not isinstance(impl, Implementation):
        raise ValueError(f"impl must be a baatt.Implementation; got {type(impl).__name__}")
    _REGISTRY[impl.name] = impl


def implementations() -> tuple[str, ...]:
    """Registered names, in the order ``implementation=None`` tries them."""
    return tuple(sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority))


@dataclasses.dataclass(frozen=True)
class Support:
    """What an implementation accepts, the machine it needs aside (``support_matrix``).

    Attributes:
      dtypes: names of the accepted dtypes of q, k and v.
      head_dims: accepted head dims of q and k, or None for any.
      v_head_dim_may_differ: whether v may have a head dim of its own.
      block_q, block_k: accepted block sizes among those ``BAConfig`` accepts (powers
        of two >= 8), or None for all of them.
    """

    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...] | None
    v_head_dim_may_differ: bool
    block_q: tuple[int, ...] | None
    block_k: tuple[int, ...] | None


# Each built-in implementation's rule on the inputs alone: (q_shape, k_shape, v_shape, dtype, block_q,
# block_k) -> every rule broken, or None. Its why_unavailable adds what the machine lacks.
_INPUT_RULES = {
    "mosaic_gpu": mosaic_gpu.unsupported_reason,
    "pallas": pallas_triton.unsupported_reason,
    "reference": lambda q_shape, k_shape, v_shape, dtype, block_q, block_k: None,
}
_PROBED_HEAD_DIMS = tuple(range(1, 1025))
_PROBED_BLOCKS = tuple(2**i for i in range(3, 17))


def _accepts(rule, dtype, head_dim: int, v_head_dim: int, block_q: int, block_k: int) -> bool:
    shape, v_shape = (1, 1, 1, head_dim), (1, 1, 1, v_head_dim)
    return rule(shape, shape, v_shape, jnp.dtype(dtype), block_q, block_k) is None


def support_matrix() -> dict[str, Support]:
    """The inputs each built-in implementation accepts, probed from its own rules (docs/support.md).

    Each axis (dtype, head dim, v's head dim, block_q, block_k) is probed with the
    others held at a point the implementation accepts; head dims up to 1024 and block
    sizes up to 65536 are tried, and an axis on which every probe passes reads "any".
    Implementations in the order ``implementation=None`` tries them.
    """
    table = {}
    for name in (n for n in implementations() if n in _INPUT_RULES):
        accepts = functools.partial(_accepts, _INPUT_RULES[name])
        dtype, d, bq, bk = next(point for point in itertools.product(FLOAT_DTYPES, (64, 128), (128,), (128,))
                                if accepts(point[0], point[1], point[1], point[2], point[3]))
        head_dims = tuple(x for x in _PROBED_HEAD_DIMS if accepts(dtype, x, x, bq, bk))
        block_q = tuple(b for b in _PROBED_BLOCKS if accepts(dtype, d, d, b, bk))
        block_k = tuple(b for b in _PROBED_BLOCKS if accepts(dtype, d, d, bq, b))
        table[name] = Support(
            dtypes=tuple(jnp.dtype(t).name for t in FLOAT_DTYPES if accepts(t, d, d, bq, bk)),
            head_dims=None if head_dims == _PROBED_HEAD_DIMS else head_dims,
            v_head_dim_may_differ=any(accepts(dtype, d, x, bq, bk) for x in _PROBED_HEAD_DIMS if x != d),
            block_q=None if block_q == _PROBED_BLOCKS else block_q,
            block_k=None if block_k == _PROBED_BLOCKS else block_k,
        )
    return table


def _resolve(implementation, q, k, v, config, interpret) -> Implementation:
    if implementation is None:
        names, explicit = implementations(), False
    elif isinstance(implementation, str):
        names, explicit = (implementation,), True
    elif isinstance(implementation, Sequence):
        names, explicit = tuple(implementation), True
    else:
        raise ValueError(f"implementation must be None, a name or a sequence of names; got {implementation!r}")
    reasons = {}
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"implementation must be one of {implementations()}; got {name!r}")
        reason = _REGISTRY[name].why_unavailable(q, k, v, config, interpret)
        if reason is None:
            return _REGISTRY[name]
        reasons[name] = reason
    raise ImplementationUnavailable(reasons, explicit=explicit)


@overload
def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    config: BAConfig | None = None,
    key_mask: jax.Array | None = None,
    implementation: str | Sequence[str] | None = None,
    return_stats: Literal[False] = False,
    interpret: bool = False,
    scale: float | None = None,
    selection: BlockSelection | None = None,
    debug_checks: bool = False,
    is_causal: bool = False,
    head_budget: jax.Array | None = None,
    query_positions: jax.Array | None = None,
) -> jax.Array: ...


@overload
def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    config: BAConfig | None = None,
    key_mask: jax.Array | None = None,
    implementation: str | Sequence[str] | None = None,
    return_stats: Literal[True],
    interpret: bool = False,
    scale: float | None = None,
    selection: BlockSelection | None = None,
    debug_checks: bool = False,
    is_causal: bool = False,
    head_budget: jax.Array | None = None,
    query_positions: jax.Array | None = None,
) -> tuple[jax.Array, AttentionStats]: ...


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    config: BAConfig | None = None,
    key_mask: jax.Array | None = None,
    implementation: str | Sequence[str] | None = None,
    return_stats: bool = False,
    interpret: bool = False,
    scale: float | None = None,
    selection: BlockSelection | None = None,
    debug_checks: bool = False,
    is_causal: bool = False,
    head_budget: jax.Array | None = None,
    query_positions: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, AttentionStats]:
    """Block approximate sparse attention, a drop-in for ``jax.nn.dot_product_attention``.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (Hkv divides Hq). Array-likes.
      config: ``BAConfig`` (default ``BAConfig()``: every block kept).
      key_mask: bool [B, Lk] (array-like), True = real key; padding never contributes
        and is never read. A batch row without any real key attends to nothing: its
        output is 0 and its lse -inf, in an eager call and under ``jit`` alike
        (``jax.nn.dot_product_attention`` returns the mean of v over the masked keys).
      implementation: None (best available), a name, or an ordered sequence of names.
      return_stats: also return ``AttentionStats``: ``implementation``, ``density``
        [B, Hq], ``selection`` and ``lse`` [B, Hq, Lq].
      interpret: run Pallas kernels in interpret mode (CPU).
      scale: logit scale, a finite positive number, default 1/sqrt(D). A traced scale
        (under ``jit``) scales q before the sparse operator; where it is not finite
        and positive the output is NaN.
      selection: reuse a selection made earlier (e.g. by ``baatt.select_blocks``
        or a previous call's stats, across denoising steps) instead of
        estimating one; ``config`` is then not used to select. Its rules are
        ``BlockSelection.validate``'s; a traced selection that breaks them cannot
        read out of bounds, and the query rows it breaks them for are NaN.
      debug_checks: under a transform, also report NaN/Inf inputs and broken
        selection rules as ``jax.experimental.checkify`` errors; wrap the function in
        ``checkify.checkify`` to get them (eager calls raise without it).
      is_causal: query ``i`` sees keys ``j <= i`` (aligned at the top left when Lq != Lk,
        as ``jax.nn.dot_product_attention``): shorthand for
        ``config.mask=AttentionMask.causal()``; block-causal attention is
        ``BAConfig(mask=AttentionMask.block_causal(G))``. A ``selection`` must have been
        made under the same mask. Keys that no query may see (Lk > Lq) count as padding.
      head_budget: per-head budgets, [Hq] or [B, Hq]: key blocks kept per query block (ints)
        or kept fractions of the key blocks (floats in (0, 1]), in place of the config's
        budget rule; the selector ranks by its ``block_map``
        (``baatt.selection.calibrate.select_with_budget``). A concrete budget sets the list
        width to its largest count, a traced one to every block; either way the counts are
        not compiled in. ``baatt.selection.calibrate.calibrate_budgets`` finds them.
      query_positions: int [B or 1, m]: the queries the selector estimates from, for a
        selector that reads a subset of the queries (``Selector.query_positions``:
        ``last_query``, and ``prompt_gen`` around it), in place of its own choice (the
        last ones). A masked-diffusion sampler passes the positions of the block being
        decoded. Each must lie in [0, Lq): an eager call raises otherwise; under ``jit``
        every output row of a batch element with a position outside is NaN.

    Non-finite inputs follow ``jax.nn.dot_product_attention``, whatever blocks are
    kept: NaN/Inf in a query row makes that output row NaN, in k at a real key the
    rows that see that key (under the mask) in the query heads its kv head serves, in
    v at a real key the output dims where v holds it in every row of those heads;
    gradients carry the NaN too. An eager call (every input concrete, closed-over
    ones included) raises a ``ValueError`` naming the first offending token instead.

    Returns:
      out [B, Lq, Hq, D] in q's dtype, or (out, stats).

    Raises:
      ValueError: bad shapes, dtypes, configuration or (in an eager call) values.
      ImplementationUnavailable: (a ``NotImplementedError``) none of the
        implementations asked for can run these inputs here; it lists every reason
        of each.
      NotImplementedError: second-order derivatives through a kernel implementation
        (``"pallas"``, ``"mosaic_gpu"``); ``"reference"`` supports them.
    """
    config = BAConfig() if config is None else config
    if not isinstance(config, BAConfig):
        raise ValueError(f"config must be a baatt.BAConfig; got {type(config).__name__}")
    config = with_is_causal(config, is_causal)
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    key_mask = None if key_mask is None else jnp.asarray(key_mask)
    check_qkv(q, k, v, key_mask=key_mask, require_real_key=False)
    key_mask = layout.visible_key_mask(key_mask, config.mask, q.shape[0], q.shape[1], k.shape[1])
    scale, traced_scale = check_scale(scale, q.shape[-1])
    if selection is not None:
        if not isinstance(selection, BlockSelection):
            raise ValueError(f"selection must be a baatt.BlockSelection; got {type(selection).__name__}")
        selection.validate(batch=q.shape[0], q_heads=q.shape[2], kv_heads=k.shape[2],
                           length_q=q.shape[1], length_k=k.shape[1])
        _check_selection_mask(selection, config)
        # The kernel's block sizes are those the selection was made with.
        config = config.replace(block_size=selection.block_q, block_size_k=selection.block_k)
    else:
        check_sink_positions(config, k.shape[1])
    head_counts = head_kmax = None
    if head_budget is not None:
        if selection is not None:
            raise ValueError("give selection or head_budget, not both: a selection already fixes its budget")
        head_counts, head_kmax = head_counts_from_budget(head_budget, batch=q.shape[0], q_heads=q.shape[2],
                                                         num_k_blocks=-(-k.shape[1] // config.block_k))
    if query_positions is not None:
        query_positions = _check_query_positions(query_positions, config, q.shape[0], q.shape[1],
                                                 selection=selection, head_budget=head_budget)
    if is_concrete(q, k, v, key_mask, selection, traced_scale, query_positions):
        check_finite(q=q, k=k, v=v, key_mask=key_mask)
    elif debug_checks:
        _debug_checks(q, k, v, key_mask, selection, traced_scale)
    impl = _resolve(implementation, q, k, v, config, interpret)
    out, lse, selection, guard = _pipeline(q, k, v, key_mask, selection, traced_scale, head_counts, query_positions,
                                           config, impl.name, interpret, scale, head_kmax)
    if not return_stats:
        return out
    nk = -(-k.shape[1] // selection.block_k)
    stats = AttentionStats(implementation=impl.name, density=selection.density(nk), selection=selection, lse=lse,
                           guard=guard)
    return out, stats


def _debug_checks(q, k, v, key_mask, selection, traced_scale) -> None:
    """The value rules as ``checkify`` checks, for inputs known only at run time."""
    debug_check_finite(q, k, v, key_mask)
    if selection is not None:
        _, bad_rows = selection.guarded(length_q=q.shape[1], length_k=k.shape[1])
        batch, row, head = jnp.unravel_index(jnp.argmax(bad_rows), bad_rows.shape)
        checkify.check(~jnp.any(bad_rows), "selection breaks the rules of BlockSelection.validate for query row "
                       "{row} (batch {batch}, head {head})", row=row, batch=batch, head=head)
    if traced_scale is not None:
        checkify.check(jnp.isfinite(traced_scale) & (traced_scale > 0),
                       "scale must be a finite positive number; got {scale}", scale=traced_scale)


def _check_query_positions(query_positions, config: BAConfig, batch: int, length_q: int, *, selection,
                           head_budget) -> jax.Array:
    """``query_positions`` as int32 [B or 1, m], after its rules (values only when concrete)."""
    if selection is not None or head_budget is not None:
        raise ValueError("give query_positions without selection and head_budget: it steers the selector, which "
                         "neither a given selection nor per-head budgets run")
    taking = tuple(name for name, sel in SELECTORS.items() if sel.query_positions)
    if not get_selector(config.selector).query_positions:
        raise ValueError(f"query_positions: selector {config.selector!r} estimates from queries of its own choice; "
                         f"the selectors that take query_positions are {taking}")
    pos = jnp.asarray(query_positions)
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"query_positions must hold ints; got dtype {pos.dtype}")
    if pos.ndim != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] < 1:
        raise ValueError(f"query_positions must have shape [batch ({batch}) or 1, m >= 1]; got {pos.shape}")
    if is_concrete(pos) and not bool(jnp.all((pos >= 0) & (pos < length_q))):
        raise ValueError(f"query_positions must lie in [0, Lq={length_q}); got values in "
                         f"[{int(jnp.min(pos))}, {int(jnp.max(pos))}]")
    return pos.astype(jnp.int32)


def _check_selection_mask(selection: BlockSelection, config: BAConfig) -> None:
    if selection.mask != config.mask:
        raise ValueError(f"selection was made under a {selection.mask.describe()} mask but attention runs under "
                         f"{config.mask.describe()}: a selection may only run under the mask it was made with "
                         "(give select_blocks and attention the same is_causal / config.mask)")


def takes_positional_path(impl: Implementation, q, k, key_mask, selection: BlockSelection, interpret: bool) -> bool:
    """Whether ``impl`` runs on the caller's [B, L, H, D] arrays (no block-space copies): it offers a
    positional operator, the selection is unpermuted, there is no key mask and lengths are whole blocks.
    A causal or block-causal mask applies on positions, so it takes this path too."""
    return (impl.positional_op is not None and not interpret and key_mask is None and selection.q_perm is None
            and selection.k_perm is None
            and q.shape[1] % selection.block_q == 0 and k.shape[1] % selection.block_k == 0)


@functools.partial(jax.jit, static_argnums=(8, 9, 10, 11, 12))
def _pipeline(q, k, v, key_mask, selection, traced_scale, head_counts, query_positions, config, impl_name, interpret,
              scale, head_kmax):
    """estimate -> select -> permute into block space -> sparse operator -> scatter back -> NaN rules.

    A ``selection`` given by the caller is guarded (``BlockSelection.guarded``). A
    ``traced_scale`` (``scale`` is then 1.0) scales q for the sparse operator only: the
    selection is made on the caller's q. ``query_positions`` go to the selector (not to a
    sharded implementation's estimator). The rows that non-finite inputs, a broken
    selection, a bad traced scale or a query position out of range reach get NaN added (``nonfinite_poison``), and so
    do the output dims that NaN/Inf in v reaches.
    """
    impl = _REGISTRY[impl_name]
    poison, poisoned_columns = nonfinite_poison(q, k, v, key_mask, config.mask)
    guard = None
    if selection is not None:
        selection, bad_rows = selection.guarded(length_q=q.shape[1], length_k=k.shape[1])
        poison = poison + nan_where(bad_rows)
    else:
        if head_counts is not None:
            selection = select_with_budget(q, k, config, head_counts, kmax=head_kmax, key_mask=key_mask)
        elif query_positions is not None:
            outside = jnp.any((query_positions < 0) | (query_positions >= q.shape[1]), axis=1)  # [B or 1]
            poison = poison + nan_where(outside)[:, None, None]
            selection = get_selector(config.selector).select(q, k, config, key_mask=key_mask,
                                                             query_positions=query_positions)
        elif impl.estimator is not None:
            selection = impl.estimator(q, k, config, key_mask=key_mask, interpret=interpret)
        else:
            selection = get_selector(config.selector).select(q, k, config, key_mask=key_mask)
        if config.guard_recall is not None:  # checked on the caller's q, as the selection was made
            guard_scale = scale if traced_scale is None else scale * traced_scale
            selection, guard = guard_selection(q, k, selection, config, key_mask=key_mask, scale=guard_scale)
    _check_selection_mask(selection, config)  # a selector or estimator that dropped the mask
    if traced_scale is not None:
        acc = jnp.promote_types(q.dtype, jnp.float32)
        q = (q.astype(acc) * traced_scale.astype(acc)).astype(q.dtype)
        poison = poison + nan_where(~(jnp.isfinite(traced_scale) & (traced_scale > 0)))
    if takes_positional_path(impl, q, k, key_mask, selection, interpret):
        out, lse = impl.positional_op(q, k, v, selection.indices, selection.counts, scale=scale,
                                      block_q=selection.block_q, block_k=selection.block_k, mask=selection.mask)
    else:
        space = layout.to_block_space(
            q, k, v, block_q=selection.block_q, block_k=selection.block_k,
            key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm, mask=selection.mask,
        )
        out_b, lse_b = impl.sparse_op(space, selection.indices, selection.counts, scale=scale, interpret=interpret)
        out, lse = layout.from_block_space(out_b, lse_b, length_q=q.shape[1], q_perm=selection.q_perm)
    if config.tail == "pooled":  # plain JAX after any operator: its (out, lse) and the pooled tail, in log space
        out, lse = add_pooled_tail(q, k, v, out, lse, selection, key_mask=key_mask, scale=scale,
                                   group=config.tail_group, refine=config.tail_refine,
                                   temperature=config.tail_temperature)
    out = out + (poison[..., None] + poisoned_columns).astype(out.dtype)
    return out, lse + jnp.swapaxes(poison, 1, 2), selection, guard
