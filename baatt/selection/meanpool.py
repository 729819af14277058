"""Mean pooling: BA-Att's scores without sorting or compensation.

Follows the block-sparse pattern search of MInference (arXiv 2407.02490) and
FlexPrefill's query-aware heads (arXiv 2502.20766): softmax of pooled Q against
pooled K, top blocks per query block.
"""

from __future__ import annotations

from baatt.config import BAConfig
from baatt.selection import baatt as _baatt
from baatt.selection.types import BlockSelection


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    return _baatt.select(q, k, config.replace(sort_q=False, sort_k=False, compensate=False), key_mask=key_mask)
