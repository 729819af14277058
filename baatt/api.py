"""``baatt.attention``: the public entry point and the registry of implementations.

One dispatcher. An implementation supplies the block-sparse operator in block
space (``layout.BlockSpace`` + selection -> out, lse) and may replace the
estimator. ``implementation=None`` picks the first available in priority
order and says which in the stats; an explicitly requested implementation that
cannot run raises with the reason, never falls back silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from baatt import layout
from baatt.config import BAConfig
from baatt.reference.attention import block_sparse_blocked
from baatt.selection import get_selector
from baatt.selection.types import BlockSelection
from baatt.validation import check_finite, check_qkv


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered backend.

    name: registry key.
    priority: higher is tried first when ``implementation=None``.
    unavailable: ``(q, k, v, config, interpret) -> reason or None``; a reason
      means it cannot run these inputs here.
    sparse: ``(space, indices, counts, *, scale, interpret) -> (out, lse)`` in
      block space (see ``layout.BlockSpace``).
    select: optional fast estimator ``(q, k, config, *, key_mask, interpret) -> BlockSelection``;
      None means the reference selectors.
    positional: optional ``(q, k, v, indices, counts, *, scale, block_q, block_k) -> (out, lse)``
      on the caller's [B, L, H, D] arrays, used when the selection is unpermuted, there is no key
      mask and lengths are whole blocks (skips the block-space copies).
    """

    name: str
    priority: int
    unavailable: Callable[..., str | None]
    sparse: Callable[..., tuple[jax.Array, jax.Array]]
    select: Callable[..., BlockSelection] | None = None
    positional: Callable[..., tuple[jax.Array, jax.Array]] | None = None


_REGISTRY: dict[str, Implementation] = {}


def register_implementation(impl: Implementation) -> None:
    _REGISTRY[impl.name] = impl


def implementations() -> tuple[str, ...]:
    """Registered names, in the order ``implementation=None`` tries them."""
    return tuple(sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority))


def _reference_sparse(space, indices, counts, *, scale, interpret=False):
    del interpret
    return block_sparse_blocked(space, indices, counts, scale=scale)


register_implementation(
    Implementation(name="reference", priority=0, unavailable=lambda *a, **kw: None, sparse=_reference_sparse)
)


def _resolve(implementation, q, k, v, config, interpret) -> Implementation:
    if implementation is None:
        names, explicit = implementations(), False
    elif isinstance(implementation, str):
        names, explicit = (implementation,), True
    elif isinstance(implementation, Sequence):
        names, explicit = tuple(implementation), True
    else:
        raise ValueError(f"implementation must be None, a name or a sequence of names; got {implementation!r}")
    reasons = []
    for name in names:
        if name not in _REGISTRY:
            raise ValueError(f"implementation must be one of {implementations()}; got {name!r}")
        reason = _REGISTRY[name].unavailable(q, k, v, config, interpret)
        if reason is None:
            return _REGISTRY[name]
        reasons.append(f"{name}: {reason}")
    what = "requested implementation(s) cannot run" if explicit else "no implementation can run"
    raise ValueError(f"{what}: " + "; ".join(reasons))


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
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Block approximate sparse attention, a drop-in for ``jax.nn.dot_product_attention``.

    Args:
      q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (Hkv divides Hq).
      config: ``BAConfig`` (default ``BAConfig()``: every block kept).
      key_mask: bool [B, Lk], True = real key; padding never contributes.
      implementation: None (best available), a name, or an ordered sequence of names.
      return_stats: also return a dict with ``implementation``, ``density``
        [B, Hq], ``selection`` and ``lse`` [B, Hq, Lq].
      interpret: run Pallas kernels in interpret mode (CPU).
      scale: logit scale, default 1/sqrt(D).
      selection: reuse a selection made earlier (e.g. by ``baatt.select_blocks``
        or a previous call's stats, across denoising steps) instead of
        estimating one; ``config`` is then not used to select.

    Returns:
      out [B, Lq, Hq, D] in q's dtype, or (out, stats).
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
    stats = dict(implementation=impl.name, density=selection.density(nk), selection=selection, lse=lse)
    return out, stats


def takes_positional_path(impl: Implementation, q, k, key_mask, selection: BlockSelection, interpret: bool) -> bool:
    """Whether ``impl`` runs on the caller's [B, L, H, D] arrays (no block-space copies): it offers a
    positional operator, the selection is unpermuted, there is no key mask and lengths are whole blocks."""
    return (impl.positional is not None and not interpret and key_mask is None and selection.q_perm is None
            and selection.k_perm is None and q.shape[1] % selection.block_q == 0
            and k.shape[1] % selection.block_k == 0)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _pipeline(q, k, v, key_mask, selection, config, impl_name, interpret, scale):
    """estimate -> select -> permute into block space -> sparse operator -> scatter back."""
    impl = _REGISTRY[impl_name]
    if selection is None and impl.select is not None:
        selection = impl.select(q, k, config, key_mask=key_mask, interpret=interpret)
    elif selection is None:
        selection = get_selector(config.selector)(q, k, config, key_mask=key_mask)
    if takes_positional_path(impl, q, k, key_mask, selection, interpret):
        out, lse = impl.positional(q, k, v, selection.indices, selection.counts, scale=scale,
                                   block_q=selection.block_q, block_k=selection.block_k)
        return out, lse, selection
    space = layout.to_block_space(
        q, k, v, block_q=selection.block_q, block_k=selection.block_k,
        key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm,
    )
    out_b, lse_b = impl.sparse(space, selection.indices, selection.counts, scale=scale, interpret=interpret)
    out, lse = layout.from_block_space(out_b, lse_b, length_q=q.shape[1], q_perm=selection.q_perm)
    return out, lse, selection
