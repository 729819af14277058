"""BA-Att: pre-downsample scores with optional norm sorting and compensation (SPEC.md sections 2-6)."""

from __future__ import annotations

from baatt.config import BAConfig
from baatt.reference.downsample import estimate
from baatt.selection.common import finish
from baatt.selection.types import BlockSelection


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    est = estimate(q, k, config, key_mask=key_mask)
    return finish(est.scores, q, k, config, q_perm=est.q_perm, k_perm=est.k_perm)
