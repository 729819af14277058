"""baatt: Block Approximate Sparse Attention in JAX and Pallas."""

from baatt import reference
from baatt.api import Implementation, attention, implementations, register_implementation
from baatt.config import SELECTORS, BAConfig
from baatt.selection import select_blocks
from baatt.selection.types import BlockSelection

__all__ = [
    "BAConfig",
    "BlockSelection",
    "Implementation",
    "SELECTORS",
    "attention",
    "implementations",
    "reference",
    "register_implementation",
    "select_blocks",
]
__version__ = "0.1.0"

from baatt import kernels as _kernels  # noqa: E402,F401  (registers kernel backends)
