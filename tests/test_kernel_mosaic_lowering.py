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
