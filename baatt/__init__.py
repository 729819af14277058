"""baatt: Block Approximate Sparse Attention in JAX and Pallas."""

import importlib

from baatt import reference
from baatt.api import (
    AttentionStats,
    ImplementationUnavailable,
    Support,
    attention,
    implementations,
    register_implementation,
    support_matrix,
)
from baatt.attention_mask import AttentionMask
from baatt.config import BAConfig
from baatt.kernels.base import Implementation
from baatt.reference import dense_attention
from baatt.selection import select_blocks
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SELECTORS, register_selector

__all__ = [
    "AttentionMask",
    "AttentionStats",
    "BAConfig",
    "BlockSelection",
    "Implementation",
    "ImplementationUnavailable",
    "SELECTORS",
    "Support",
    "attention",
    "dense_attention",
    "implementations",
    "nn",
    "reference",
    "register_implementation",
    "register_selector",
    "select_blocks",
    "support_matrix",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # baatt.nn (Flax NNX layers, the DLM and its loaders) imports flax and the checkpoint readers,
    # which the attention functions do not need: it loads on first use of ``baatt.nn``.
    if name == "nn":
        return importlib.import_module("baatt.nn")
    raise AttributeError(f"module 'baatt' has no attribute {name!r}")
