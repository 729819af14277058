"""The warp-specialised pipeline shared by the Mosaic GPU forward, dq and dk/dv kernels.

Every kernel runs CTAs of ``CONSUMERS`` consumer warpgroups (wgmma on ``WG_ROWS``
rows each) and one producer warpgroup that streams tiles into a shared-memory
ring with TMA. Here: the launch, the collective allocation of shared memory and
barriers, the grid and its work items, the walk over a selection row, the causal
mask of a score tile, and the turn-taking of the consumers on the tensor cores.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from baatt import platform
from baatt.kernels.common import key_limit, tile_start
from baatt.kernels.mosaic_gpu.config import CONSUMERS

# Shared-memory layout of every wgmma operand tile (8 x 64 tiles, 128-byte swizzle).
SWIZZLED = {"transforms": (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))}


def row_view(positional: bool):
    """(ref, b, h, rows) -> the [rows, D] view of a [B, H, L, D] (block space) or [B, L, H, D] array."""
    if positional:
        return lambda ref, bb, hh, rows: ref.at[bb, rows, hh]
    return lambda ref, bb, hh, rows: ref.at[bb, hh, rows]


def tile_grid(heads: int, tiles: int, batch: int, tile_name: str, tile_major: bool):
    # Pallas launches its grid row-major: the last axis varies fastest (CUDA's x). Grid axes carry a
    # "baatt_" prefix: inside shard_map, lax.axis_index of a name the caller's mesh also has ("heads",
    # "batch") resolves to the mesh axis and turns the kernel into a multi-device (NVSHMEM) one.
    if tile_major:
        return (heads, tiles, batch), ("baatt_heads", tile_name, "baatt_batch")
    return (tiles, heads, batch), (tile_name, "baatt_heads", "baatt_batch")


def work_items(persistent: bool, num_ctas, heads: int, tiles: int, batch: int, tile_name: str, tile_major: bool):
    """(number of work items of this CTA, item(i) -> (batch, head, tile) of its i-th).

    One CTA per item: the grid's own indices. Persistent: a 1-D grid of ``num_ctas`` CTAs, CTA c taking
    items c, c + num_ctas, ... of the (batch, head, tile) space in launch order (tiles or heads fastest).
    """
    if not persistent:
        return 1, lambda i: (lax.axis_index("baatt_batch"), lax.axis_index("baatt_heads"), lax.axis_index(tile_name))
    cta = lax.axis_index("baatt_cta")
    n_mine = lax.div(jnp.int32(heads * tiles * batch - 1) - cta, jnp.int32(num_ctas)) + 1

    def item(i):
        w = cta + i * num_ctas
        first, second = (tiles, heads) if tile_major else (heads, tiles)
        a, rest = lax.rem(w, jnp.int32(first)), lax.div(w, jnp.int32(first))
        c, bb = lax.rem(rest, jnp.int32(second)), lax.div(rest, jnp.int32(second))
        return (bb, c, a) if tile_major else (bb, a, c)

    return n_mine, item


def row_walks(persistent: bool, item, sel_ref, *, rows_per_sel: int, per_block: int, block_k: int, tile_k: int,
              rotate: bool):
    """walk(i) -> (b, h, q tile, steps, first key row of a step) of a CTA's i-th item over the forward list
    (one CTA per item: read once, up front)."""
    def walk_item(i):
        b, h, qt = item(i)
        srow = lax.div(qt, jnp.int32(rows_per_sel)) if rows_per_sel > 1 else qt
        steps = sel_ref[b, h, srow, 0] * per_block
        return b, h, qt, steps, functools.partial(walk_tile_start, sel_ref, b, h, srow, qt, steps,
                                                  block_k=block_k, tile_k=tile_k, rotate=rotate)

    if persistent:
        return walk_item
    first = walk_item(0)
    return lambda i: first


def produce_items(n_mine, walk, fill) -> None:
    """A persistent producer over the forward lists: ``fill(walk(i), step, n)`` for every step of each of
    the CTA's items in turn, ``n`` counting the ring's uses across items."""
    def produce(i, n):
        w = walk(i)

        def step(s, n):
            fill(w, s, n)
            return n + 1

        return lax.fori_loop(0, w[3], step, n)

    lax.fori_loop(0, n_mine, produce, jnp.int32(0))


def bias_and_outputs(rest, masked: bool):
    """The kernel refs after the inputs: (key bias or None, outputs)."""
    return (rest[0], rest[1:]) if masked else (None, rest)


def hide_past_limit(s, first_query, first_key, span: int, keys_axis: int):
    """Score tile ``s`` (WGMMA layout) with ``-inf`` where a causal mask of span ``span`` hides a key from a
    query; positions count from ``first_query`` and ``first_key`` along the query and the key axis
    (``keys_axis``). A select, not an added bias, so a NaN logit of a hidden key cannot survive it.

    Token-causal (span 1): key ``k`` is visible from query ``q`` when ``k <= q``, one comparison of the
    difference of two iotas against a scalar. Block-causal: the generation block is a multiple of ``block_q`` (hence of
    every query tile), so all of a tile's queries share one key limit.
    """
    keys = plgpu.broadcasted_iota(jnp.int32, s.shape, keys_axis, layout=plgpu.Layout.WGMMA)
    if span == 1:
        queries = plgpu.broadcasted_iota(jnp.int32, s.shape, 1 - keys_axis, layout=plgpu.Layout.WGMMA)
        visible = keys - queries <= first_query - first_key
    else:
        visible = keys < key_limit(first_query, span) - first_key
    return jnp.where(visible, s, -jnp.inf)


def mask_on_edge(s, first_query, first_key, num_keys: int, span: int, keys_axis: int = 1):
    """``s`` under the causal mask of span ``span``. Only a tile whose last key lies past its first query's
    limit (the lowest of its queries) compares positions; a tile every query sees whole takes the other
    branch of a run-time ``cond`` and stays unmasked."""
    crosses = first_key + num_keys > key_limit(first_query, span)
    hide = functools.partial(hide_past_limit, first_query=first_query, first_key=first_key, span=span,
                             keys_axis=keys_axis)
    return lax.cond(crosses, hide, lambda s: s, s)


def take_turn_at(turn):
    """Hand the tensor cores to the other consumer warpgroup and wait until they come back."""
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def walk_tile_start(sel_ref, b, h, srow, cta, steps, step, *, block_k: int, tile_k: int, rotate: bool):
    """First key row of step ``step`` of a CTA's walk over its selected tiles. A rotated walk starts
    at a different tile per CTA (softmax and gradient sums do not care about order)."""
    if rotate:
        step = lax.rem(step + lax.rem(cta, jnp.maximum(steps, 1)), jnp.maximum(steps, 1))
    return tile_start(lambda j: sel_ref[b, h, srow, 1 + j], step, block_k, tile_k)


def load_own_tiles(copies, ready, wg):
    """A consumer warpgroup's own rows: one TMA copy per (source, shared-memory destination) pair, each
    on its own barrier (``i * CONSUMERS + wg``), then wait for all of them."""
    for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, ready.at[i * CONSUMERS + wg])
    for i in range(len(copies)):
        plgpu.barrier_wait(ready.at[i * CONSUMERS + wg])


def run_warp_specialized(kernel, scratch, barriers):
    """Allocate the shared memory and barriers collectively over the warpgroups, then run ``kernel``."""
    pl.run_scoped(lambda *a: kernel(a[:len(scratch)], a[len(scratch):]), *scratch, *barriers, collective_axes="baatt_wg")


def launch(body, out_type, grid_and_names, *, name: str, interpret: bool = False):
    """One CTA per grid point: CONSUMERS consumer warpgroups and one producer. ``name`` is the kernel's name
    in profilers (e.g. ``ncu --kernel-name regex:baatt_``)."""
    grid, names = grid_and_names
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=names,
        num_threads=CONSUMERS + 1,
        thread_name="baatt_wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )


def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (without one, e.g. when lowering on a CPU, an H100/H200
    SXM's 132)."""
    gpus = platform.gpu_devices()
    return int(getattr(gpus[0], "core_count", 0) or 132) if gpus else 132
