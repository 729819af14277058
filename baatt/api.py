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

import functools
import math
from collections.abc import Sequence
from typing import Literal, TypedDict, overload

import jax

from baatt import layout
from baatt.config import BAConfig
from baatt.kernels import BACKENDS
from baatt.kernels.base import Implementation
from baatt.reference.attention import block_sparse_blocked
from baatt.selection import get_selector
from baatt.selection.types import BlockSelection
from baatt.validation import check_finite, check_qkv


class ImplementationUnavailable(NotImplementedError):
    """No implementation that was tried can run these inputs here.

    ``reasons`` maps each implementation tried, in order, to every reason it gave
    (its ``why_unavailable``).
    """

    def __init__(self, reasons: dict[str, str], *, explicit: bool):
        self.reasons = reasons
        what = "requested implementation(s) cannot run" if explicit else "no implementation can run"
        super().__init__(f"{what}: " + "; ".join(f"{name}: {why}" for name, why in reasons.items()))


class AttentionStats(TypedDict):
    """What ``attention(..., return_stats=True)`` returns beside the output.

    implementation: the name of the implementation that ran; density [B, Hq]: the
    fraction of block pairs computed; selection: the ``BlockSelection`` used (reusable
    through ``attention(selection=...)``); lse [B, Hq, Lq]: the log-sum-exp of each row.
    """

    implementation: str
    density: jax.Array
    selection: BlockSelection
    lse: jax.Array


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
) -> jax.Array | tuple[jax.Array, AttentionStats]:
    """Block approximate sparse attention, a drop-in for ``jax.nn.dot_product_attention``.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (Hkv divides Hq).
      config: ``BAConfig`` (default ``BAConfig()``: every block kept).
      key_mask: bool [B, Lk], True = real key; padding never contributes.
      implementation: None (best available), a name, or an ordered sequence of names.
      return_stats: also return ``AttentionStats``: ``implementation``, ``density``
        [B, Hq], ``selection`` and ``lse`` [B, Hq, Lq].
      interpret: run Pallas kernels in interpret mode (CPU).
      scale: logit scale, default 1/sqrt(D).
      selection: reuse a selection made earlier (e.g. by ``baatt.select_blocks``
        or a previous call's stats, across denoising steps) instead of
        estimating one; ``config`` is then not used to select.

    Returns:
      out [B, Lq, Hq, D] in q's dtype, or (out, stats).

    Raises:
      ImplementationUnavailable: (a ``NotImplementedError``) none of the
        implementations asked for can run these inputs here; it lists every reason
        of each.
    """
    config = BAConfig() if config is None else config
    if not isinstance(config, BAConfig):
        raise ValueError(f"config must be a baatt.BAConfig; got {type(config).__name__}")
    check_qkv(q, k, v, key_mask=key_mask)
    check_finite(q=q, k=k, v=v, key_mask=key_mask)
    if selection is not None:
        if not isinstance(selection, BlockSelection):
            raise ValueError(f"selection must be a baatt.BlockSelection; got {type(selection).__name__}")
        selection.validate(batch=q.shape[0], q_heads=q.shape[2], kv_heads=k.shape[2],
                           length_q=q.shape[1], length_k=k.shape[1])
        # The kernel's block sizes are those the selection was made with.
        config = config.replace(block_size=selection.block_q, block_size_k=selection.block_k)
    impl = _resolve(implementation, q, k, v, config, interpret)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse, selection = _pipeline(q, k, v, key_mask, selection, config, impl.name, interpret, scale)
    if not return_stats:
        return out
    nk = -(-k.shape[1] // selection.block_k)
    stats = AttentionStats(implementation=impl.name, density=selection.density(nk), selection=selection, lse=lse)
    return out, stats


def takes_positional_path(impl: Implementation, q, k, key_mask, selection: BlockSelection, interpret: bool) -> bool:
    """Whether ``impl`` runs on the caller's [B, L, H, D] arrays (no block-space copies): it offers a
    positional operator, the selection is unpermuted, there is no key mask and lengths are whole blocks."""
    return (impl.positional_op is not None and not interpret and key_mask is None and selection.q_perm is None
            and selection.k_perm is None and q.shape[1] % selection.block_q == 0
            and k.shape[1] % selection.block_k == 0)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _pipeline(q, k, v, key_mask, selection, config, impl_name, interpret, scale):
    """estimate -> select -> permute into block space -> sparse operator -> scatter back."""
    impl = _REGISTRY[impl_name]
    if selection is None and impl.estimator is not None:
        selection = impl.estimator(q, k, config, key_mask=key_mask, interpret=interpret)
    elif selection is None:
        selection = get_selector(config.selector).select(q, k, config, key_mask=key_mask)
    if takes_positional_path(impl, q, k, key_mask, selection, interpret):
        out, lse = impl.positional_op(q, k, v, selection.indices, selection.counts, scale=scale,
                                      block_q=selection.block_q, block_k=selection.block_k)
        return out, lse, selection
    space = layout.to_block_space(
        q, k, v, block_q=selection.block_q, block_k=selection.block_k,
        key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm,
    )
    out_b, lse_b = impl.sparse_op(space, selection.indices, selection.counts, scale=scale, interpret=interpret)
    out, lse = layout.from_block_space(out_b, lse_b, length_q=q.shape[1], q_perm=selection.q_perm)
    return out, lse, selection
