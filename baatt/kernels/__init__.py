"""Kernel backends. Importing this package registers every backend with ``baatt.api``."""

from baatt.kernels import pallas_triton  # noqa: F401  (registers "pallas")
from baatt.kernels import mosaic_gpu  # noqa: F401  (registers "mosaic_gpu")
