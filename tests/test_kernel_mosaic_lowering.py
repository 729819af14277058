"""The Mosaic GPU kernels lower for Hopper on any machine.

``jax.export`` with ``platforms=["cuda"]`` runs the whole Pallas -> Mosaic GPU
lowering of the forward, dq and dk/dv kernels (warp specialisation, barriers,
TMA copies, wgmma) without a GPU, so a kernel that no longer traces or lowers
fails here, on CPU, before it reaches a Hopper machine. What it cannot check
(PTX compilation, numerics, speed) is in ``tests/test_kernel_mosaic.py``, which
needs the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from baatt.kernels.mosaic_gpu import block_sparse as mgpu

L, D = 512, 128


def _sd(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lowers(fn, *args):
    exported = export.export(jax.jit(fn), platforms=["cuda"])(*args)
    text = exported.mlir_module()
    assert "mosaic_gpu" in text  # the kernels became Mosaic GPU custom calls, not an XLA fallback
    return text


def _loss(attend):
    return jax.grad(lambda *a: jnp.sum(attend(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2))


@pytest.mark.parametrize(("q_heads", "kv_heads", "dtype", "blocks", "tuning", "bwd_tuning"), [
    (2, 2, jnp.bfloat16, (128, 128), mgpu.DEFAULT_TUNING, mgpu.DEFAULT_BWD_TUNING),
    (4, 2, jnp.float16, (256, 256), mgpu.Tuning(tile_major=True, rotate=False),
     mgpu.BwdTuning(pingpong=True, rotate=False, tile_major=True)),
    (4, 1, jnp.bfloat16, (256, 128), mgpu.Tuning(stages=2), mgpu.BwdTuning(pingpong=True, dkv_stages=2)),
])
def test_positional_forward_and_backward_lower(q_heads, kv_heads, dtype, blocks, tuning, bwd_tuning):
    bq, bk = blocks
    q, k = _sd(1, L, q_heads, D, dtype=dtype), _sd(1, L, kv_heads, D, dtype=dtype)
    idx, cnt = _sd(1, q_heads, L // bq, 2, dtype=jnp.int32), _sd(1, q_heads, L // bq, dtype=jnp.int32)

    def attend(q, k, v, i, c):
        return mgpu.positional_attention(q, k, v, i, c, scale=0.1, block_q=bq, block_k=bk, tuning=tuning,
                                         backward_tuning=bwd_tuning)

    _lowers(attend, q, k, k, idx, cnt)
    _lowers(_loss(attend), q, k, k, idx, cnt)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_space_masked_forward_and_backward_lower(head_dim):
    # Block space with a key mask: the kernels stream the -inf key bias beside K.
    q, k = _sd(1, 4, L, head_dim), _sd(1, 2, L, head_dim)
    valid = _sd(1, 2, L, dtype=jnp.bool_)
    idx, cnt = _sd(1, 4, L // 128, 3, dtype=jnp.int32), _sd(1, 4, L // 128, dtype=jnp.int32)

    def attend(q, k, v, m, i, c):
        return mgpu.block_sparse_attention(q, k, v, m, i, c, scale=0.1, block_q=128, block_k=128)

    _lowers(attend, q, k, k, valid, idx, cnt)
    _lowers(_loss(attend), q, k, k, valid, idx, cnt)


def test_lowering_digests_are_deterministic():
    """scripts/mosaic_digest.py, the check for refactoring the kernels on CPU, relies on the lowered
    modules being the same on every run; a backward lowers three kernels (forward, dq, dk/dv)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "mosaic_digest.py"
    spec = importlib.util.spec_from_file_location("mosaic_digest", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    first, second = tool.digests(quick=True), tool.digests(quick=True)
    assert first == second and len(first) == 3
    assert [len(v) for v in first.values()] == [1, 3, 1]
