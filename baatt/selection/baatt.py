"""BA-Att: pre-downsample scores with optional norm sorting and compensation (docs/spec.md sections 2-6)."""

from __future__ import annotations

import jax

from baatt.config import BAConfig
from baatt.selection.common import finish
from baatt.selection.estimator import estimate
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    est = estimate(q, k, config, key_mask=key_mask)
    return finish(est.scores, q, k, config, q_perm=est.q_perm, k_perm=est.k_perm)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """The pre-downsample map ``M = softmax(scores)`` (docs/spec.md section 2), in the (sorted) block space."""
    return jax.nn.softmax(estimate(q, k, config, key_mask=key_mask).scores, axis=-1)


register_selector("baatt", select=select, block_map=block_map,
                  switches=("sort_q", "sort_k", "cluster_q", "cluster_k", "compensate"))
