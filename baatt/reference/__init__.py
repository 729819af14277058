"""The specification in plain JAX (float32 accumulation). Every fast path is tested against it."""

from baatt.reference import error
from baatt.reference.attention import block_sparse_attention, dense_attention
from baatt.reference.downsample import (
    block_stats,
    estimate,
    post_downsample_map,
    pre_downsample_scores,
)
from baatt.reference.sorting import invert_permutation, norm_sort

__all__ = [
    "block_sparse_attention",
    "block_stats",
    "dense_attention",
    "error",
    "estimate",
    "invert_permutation",
    "norm_sort",
    "post_downsample_map",
    "pre_downsample_scores",
]
