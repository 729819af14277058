"""Mean pooling: BA-Att's scores without sorting or compensation.

Follows the block-sparse pattern search of MInference (arXiv 2407.02490) and
FlexPrefill's query-aware heads (arXiv 2502.20766): softmax of pooled Q against
pooled K, top blocks per query block.
"""

from __future__ import annotations

import jax

from baatt.config import BAConfig
from baatt.selection import baatt as _baatt
from baatt.selection.types import BlockSelection
from baatt.selector_registry import register_selector


def _plain(config: BAConfig) -> BAConfig:
    return config.replace(sort_q=False, sort_k=False, compensate=False)


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return _baatt.select(q, k, _plain(config), key_mask=key_mask)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Softmax of the pooled logits over positional blocks."""
    return _baatt.block_map(q, k, _plain(config), key_mask=key_mask)


register_selector("meanpool", select=select, block_map=block_map, switches=("cluster_q", "cluster_k"))
