"""Budgeted block selection (the fixed-budget step of docs/spec.md section 6) in portable Pallas (Triton lowering).

Semantics: ``baatt.selection.budget.top_blocks_reference``. For each row of
block priorities (one query block's scores over all key blocks, forced blocks
already raised to the top), keep the ``count`` largest, ties to the lower key
block id as ``jax.lax.top_k`` breaks them, and write the kept ids ascending,
entries from ``count`` on repeating the last kept id.

Why a kernel: XLA does this as two sorts (``top_k`` sorts each row of
``Nk`` scores, then the ``kmax`` kept ids are sorted again), at long lengths
the largest part of the default estimator (measurements:
``experiments/results/bench_estimator/bench_estimator_h200.md``). Here each
program reads its rows once and finds the ``count``-th largest value by radix
selection in registers, 32 rounds of compare-and-count over one bit each:

1. Scores become int32 keys with the same order (non-negative floats keep
   their bits; negative ones flip their magnitude bits). Columns beyond
   ``Nk`` get the smallest key, below ``-inf``'s.
2. The threshold ``T`` is built from the top bit down in the unsigned image
   ``u = key ^ INT_MIN`` (an order-preserving map onto unsigned order): a bit
   is set when at least ``count`` keys are ``>=`` the candidate.
3. Kept = keys above ``T``, plus the first ``count - #above`` keys equal to
   ``T`` by column (a running count), which is ``top_k``'s tie order.
4. A running count of kept columns gives each kept id its output slot;
   slots from ``count`` on get the largest kept id.

NaN scores are outside the contract (the estimator never produces them from
finite inputs, and ``baatt.attention`` rejects non-finite inputs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Used by ``select_from_scores`` when it is not told. On: on an H200 (jax 0.11.2) the GPU
# tests (tests/test_kernel_topk.py, marked gpu) pass and bench_estimator's comparison found
# the kernel's picks identical to XLA's route at 32K and 128K tokens, and the kernel faster
# (experiments/results/bench_estimator/bench_estimator_h200.md).
DEFAULT_ON_GPU = True

_INT_MIN = -(2**31)
_ROWS = 8  # rows per program: up to 8 x 1024 int32 keys, in registers (8 warps from 4K keys on)
_MAX_BLOCKS = 4096  # key blocks per row held in registers (512K tokens at block 128)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(num_k_blocks: int, kmax: int) -> str | None:
    """Why the kernel cannot select for rows of ``num_k_blocks`` scores with budget ``kmax``; None if it can."""
    if num_k_blocks > _MAX_BLOCKS:
        return f"top-k kernel holds at most {_MAX_BLOCKS} key blocks per row; got {num_k_blocks}"
    if not 1 <= kmax <= num_k_blocks:
        return f"kmax must be in [1, num_k_blocks={num_k_blocks}]; got {kmax}"
    return None


def _sortable_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered like the float32 values (IEEE order, -0 < +0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _top_blocks_kernel(p_ref, count_ref, out_ref, *, num_k_blocks: int, kmax_p: int):
    rows, width = p_ref.shape
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    keys = jnp.where(col < num_k_blocks, _sortable_keys(p_ref[...]), jnp.int32(_INT_MIN))
    count = count_ref[...]

    def radix_round(i, t_u):
        cand_u = t_u | jnp.left_shift(jnp.int32(1), 31 - i)
        cand = cand_u ^ jnp.int32(_INT_MIN)
        at_least = jnp.sum((keys >= cand[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(at_least >= count, cand_u, t_u)

    t_u = jax.lax.fori_loop(0, 32, radix_round, jnp.zeros((rows,), jnp.int32))
    threshold = (t_u ^ jnp.int32(_INT_MIN))[:, None]
    above = keys > threshold
    tied = keys == threshold
    ties_wanted = count - jnp.sum(above.astype(jnp.int32), axis=1)
    kept = above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=1) <= ties_wanted[:, None]))
    # Every column gets its own slot: kept ids first (ascending), then the others (ascending). The
    # others' stores are masked off; unique slots keep the masked scatter well defined in interpret
    # mode too, where a masked store writes the old value back.
    kept_before = jnp.cumsum(kept.astype(jnp.int32), axis=1)
    slot = jnp.where(kept, kept_before - 1, count[:, None] + col - kept_before)
    last = jnp.max(jnp.where(kept, col, -1), axis=1)

    # Padding (slots count .. kmax_p-1) first; the scatter then writes slots < count only.
    out_col = jax.lax.broadcasted_iota(jnp.int32, (rows, kmax_p), 1)
    pad = out_ref.at[:, pl.ds(0, kmax_p)]
    plgpu.store(pad, jnp.broadcast_to(last[:, None], (rows, kmax_p)), mask=out_col >= count[:, None])
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 0)
    plgpu.store(out_ref.at[row, slot], col, mask=kept)


@functools.partial(jax.jit, static_argnames=("kmax", "interpret"))
def top_blocks(priority: jax.Array, count: jax.Array, *, kmax: int, interpret: bool = False) -> jax.Array:
    """Kept key-block ids per row: int32 [..., kmax] from ``priority`` [..., Nk] and ``count`` [...].

    ``count`` must lie in [1, kmax] and not exceed the row's number of
    entries; see the module docstring for the order and the padding.
    """
    *lead, nk = priority.shape
    if count.shape != tuple(lead):
        raise ValueError(f"count must have shape {tuple(lead)} (priority without its last axis); got {count.shape}")
    if not jnp.issubdtype(priority.dtype, jnp.floating):
        raise ValueError(f"priority must be a floating-point array; got {priority.dtype}")
    reason = unsupported_reason(nk, kmax)
    if reason is not None:
        raise ValueError(reason)
    rows = math.prod(lead)
    rows_p = -(-rows // _ROWS) * _ROWS
    width, kmax_p = _pow2(nk), _pow2(kmax)
    p = priority.reshape(rows, nk).astype(jnp.float32)
    p = jnp.pad(p, ((0, rows_p - rows), (0, width - nk)))  # padded columns are masked by num_k_blocks
    c = jnp.pad(count.reshape(rows).astype(jnp.int32), (0, rows_p - rows), constant_values=1)
    out = pl.pallas_call(
        functools.partial(_top_blocks_kernel, num_k_blocks=nk, kmax_p=kmax_p),
        # One slot per column (see the kernel); only the first kmax are kept.
        out_shape=jax.ShapeDtypeStruct((rows_p, width), jnp.int32),
        grid=(rows_p // _ROWS,),
        in_specs=[pl.BlockSpec((_ROWS, width), lambda i: (i, 0)), pl.BlockSpec((_ROWS,), lambda i: (i,))],
        out_specs=pl.BlockSpec((_ROWS, width), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4 if _ROWS * width <= 4096 else 8, num_stages=1),
        name="baatt_top_blocks",
    )(p, c)
    return out[:rows, :kmax].reshape(*lead, kmax)
