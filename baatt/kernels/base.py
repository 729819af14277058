"""The record every attention backend registers: what it computes and when it cannot run.

Kernel packages build an ``Implementation`` and export it as ``IMPLEMENTATION``;
``baatt.api`` collects them into its registry. Backends never import ``baatt.api``
(that import would run in a circle through the package ``__init__``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered backend of ``baatt.attention``.

    Attributes:
      name: registry key (``implementation="..."``).
      priority: higher is tried first when ``implementation=None``.
      why_unavailable: ``(q, k, v, config, interpret) -> str | None``: every reason
        it cannot run these inputs here, joined, or None when it can.
      sparse_op: ``(space, indices, counts, *, scale, interpret) -> (out, lse)`` in block
        space (``baatt.layout.BlockSpace``).
      reference: dotted name of the specification function ``sparse_op`` is tested
        against (e.g. ``"baatt.reference.attention.block_sparse_blocked"``).
      estimator: optional fast selection ``(q, k, config, *, key_mask, interpret) ->
        BlockSelection``; None means the registered selectors.
      positional_op: optional ``(q, k, v, indices, counts, *, scale, block_q, block_k, mask) ->
        (out, lse)`` on the caller's [B, L, H, D] arrays, used when the selection is
        unpermuted, there is no key mask and lengths are whole blocks; ``mask`` is the
        selection's AttentionMask (bidirectional, causal or block-causal, on positions).
    """

    name: str
    priority: int
    why_unavailable: Callable[..., str | None]
    sparse_op: Callable[..., tuple[jax.Array, jax.Array]]
    reference: str = "baatt.reference.attention.block_sparse_blocked"
    estimator: Callable | None = None
    positional_op: Callable[..., tuple[jax.Array, jax.Array]] | None = None
