"""The specification in plain JAX (float32 accumulation). Every fast path is tested against it.

dense attention and streaming block-sparse attention (``attention.py``), the pre-downsample
scores and the oracle post-downsample map (``downsample.py``), norm permutations
(``sorting.py``) and the approximation-error metrics (``error.py``). Each registered
implementation of ``baatt.attention`` names the function here it is tested against
(``Implementation.reference``). Each takes the attention mask (``is_causal`` / ``mask``,
``config.mask``, or the one its selection or block space carries): bidirectional, causal or
block-causal (``baatt.attention_mask``).
"""

from baatt.reference import error
from baatt.reference.attention import block_sparse_attention, dense_attention
from baatt.reference.downsample import block_moments, post_downsample_map, pre_downsample_scores
from baatt.reference.sorting import invert_permutation, norm_sort

__all__ = [
    "block_moments",
    "block_sparse_attention",
    "dense_attention",
    "error",
    "invert_permutation",
    "norm_sort",
    "post_downsample_map",
    "pre_downsample_scores",
]
