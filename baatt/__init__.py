"""baatt: Block Approximate Sparse Attention in JAX and Pallas."""

from baatt import reference
from baatt.api import (
    AttentionStats,
    ImplementationUnavailable,
    attention,
    implementations,
    register_implementation,
)
from baatt.config import BAConfig
from baatt.kernels.base import Implementation
from baatt.reference import dense_attention
from baatt.selection import select_blocks
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SELECTORS, register_selector

__all__ = [
    "AttentionStats",
    "BAConfig",
    "BlockSelection",
    "Implementation",
    "ImplementationUnavailable",
    "SELECTORS",
    "attention",
    "dense_attention",
    "implementations",
    "reference",
    "register_implementation",
    "register_selector",
    "select_blocks",
]
__version__ = "0.1.0"
