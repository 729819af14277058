"""The Mosaic GPU kernels lower for Hopper on any machine.

``jax.export`` with ``platforms=["cuda"]`` runs the whole Pallas -> Mosaic GPU
lowering of the forward, dq and dk/dv kernels (warp specialisation, barriers,
TMA copies, wgmma) without a GPU, so a kernel that no longer traces or lowers
fails here, on CPU, before it reaches a Hopper machine. The variants (both
layouts, GQA, key mask, dtypes, head dims, block sizes, non-default tunings, causal
and block-causal masks) are
those of ``scripts/mosaic_digest.py``, the check for refactoring the kernels.
What this cannot check (PTX compilation, numerics, speed) is in
``tests/test_kernel_mosaic.py``, which needs the GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def digest_tool():
    path = Path(__file__).resolve().parents[1] / "scripts" / "mosaic_digest.py"
    spec = importlib.util.spec_from_file_location("mosaic_digest", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_every_variant_lowers_to_its_kernels(digest_tool):
    # A forward lowers one Mosaic GPU kernel; forward + backward three (forward, dq, dk/dv).
    result = digest_tool.digests()
    assert len(result) == len(digest_tool.variants()) == 42
    for name, modules in result.items():
        assert len(modules) == (1 if name.endswith("_fwd") else 3), name


def test_lowering_digests_are_deterministic(digest_tool):
    """The digests are only a refactoring check if the same kernels give the same digests on every run."""
    first, second = digest_tool.digests(quick=True), digest_tool.digests(quick=True)
    assert first == second and len(first) == 3
    assert [len(v) for v in first.values()] == [1, 3, 1]


def test_kernels_under_a_mesh_with_the_same_axis_names_lower_without_communication():
    # The kernels' grid axes must not share names with a caller's mesh axes: inside shard_map, a grid
    # axis called "heads" resolved to the mesh axis, and the kernel became an NVSHMEM (multi-device)
    # kernel that XLA refused to compile on one GPU.
    import re

    import jax
    import jax.experimental.mosaic.gpu.core as mosaic_core
    import jax.numpy as jnp
    from jax import export
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from baatt.kernels import mosaic_gpu as mgpu

    captured = []
    original = mosaic_core._run_serde_pass

    def capture(module, *args, **kwargs):
        if kwargs.get("serialize"):
            captured.append(module.operation.get_asm(enable_debug_info=False))
        return original(module, *args, **kwargs)

    mesh = AbstractMesh((1, 1), ("batch", "heads"), axis_types=(AxisType.Auto,) * 2)
    spec = P("batch", None, "heads", None)
    idx_spec, cnt_spec = P("batch", "heads", None, None), P("batch", "heads", None)

    def attend(q, k, v, i, c):
        body = lambda *a: mgpu.positional_attention(*a, scale=0.1, block_q=128, block_k=128)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, idx_spec, cnt_spec), check_vma=False,
                             out_specs=(spec, P("batch", "heads", None)))(q, k, v, i, c)[0]

    sd = jax.ShapeDtypeStruct
    args = (sd((1, 512, 2, 128), jnp.bfloat16),) * 3 + (sd((1, 2, 4, 2), jnp.int32), sd((1, 2, 4), jnp.int32))
    mosaic_core._run_serde_pass = capture
    try:
        grads = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2))
        export.export(jax.jit(grads), platforms=["cuda"])(*args)
    finally:
        mosaic_core._run_serde_pass = original
    assert len(captured) == 3  # forward, dq, dk/dv
    for text in captured:
        assert not re.search("nvshmem|collective_metadata", text)
