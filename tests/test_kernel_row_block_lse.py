"""The Pallas row block log-sum-exp (``baatt.kernels.pallas_triton.row_block_lse``), the GPU path of the
``pooled_query`` selector, against its XLA reference (``pooled_query.block_logsumexp_xla``, itself checked
against NumPy in tests/test_selection_query_aware.py).

``TestInterpret`` runs the checks in Pallas interpret mode on the CPU; ``TestGPU`` compiles them through
Triton on a CUDA GPU (``gpu`` marker). A lowering test builds the kernel's Triton IR for sm90 on any machine.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.triton import pallas_call_registration

import baatt
from baatt.kernels.pallas_triton import row_block_lse
from baatt.selection import pooled_query
from baatt.selection.common import positional_space

CAUSAL = baatt.AttentionMask.causal()


def inputs(seed, *, batch=2, lq=150, lk=150, hq=4, hkv=2, d=64, dtype=jnp.float32, holes=True):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, lq, hq, d)) * 1.5, dtype)
    k = jnp.asarray(rng.standard_normal((batch, lk, hkv, d)) + 0.3, dtype)
    key_mask = None
    if holes:
        key_mask = np.arange(lk)[None] < rng.integers(lk // 2, lk + 1, size=(batch, 1))
        key_mask &= rng.random((batch, lk)) > 0.15
        key_mask[:, 0] = True
        key_mask = jnp.asarray(key_mask)
    return q, k, key_mask


def both(q, k, key_mask, config, *, interpret, **tiling):
    """(kernel, XLA) block log-sum-exp of the pooled rows, [B, Hq, Nq, Nk]."""
    space = positional_space(q, k, config, key_mask)
    rows, limits = pooled_query.pooled_rows(space)
    got = row_block_lse.row_block_logsumexp(rows.astype(k.dtype), space.k, space.kv_valid, limits,
                                            scale=1 / math.sqrt(q.shape[-1]), block_k=config.block_k,
                                            interpret=interpret, **tiling)
    return np.asarray(got), np.asarray(pooled_query.block_logsumexp_xla(rows.astype(k.dtype), space, limits))


def assert_close(got, want, atol):
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=0)


class _Suite:
    interpret: bool
    dtype = jnp.float32
    atol = 1e-4

    @pytest.mark.parametrize("mask,bq,bk", [(baatt.AttentionMask(), 32, 16), (CAUSAL, 32, 32),
                                            (CAUSAL, 16, 64), (baatt.AttentionMask.block_causal(64), 64, 32)],
                             ids=["bidirectional", "causal", "causal-wide-keys", "block-causal"])
    def test_matches_xla(self, mask, bq, bk):
        q, k, key_mask = inputs(1, dtype=self.dtype)
        config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="pooled_query", mask=mask)
        assert_close(*both(q, k, key_mask, config, interpret=self.interpret), self.atol)

    @pytest.mark.parametrize("row_tile,num_warps", [(64, 4), (16, 4), (128, 4), (128, 8), (256, 8), (256, 16)])
    def test_cross_lengths_and_many_rows(self, row_tile, num_warps):
        """207 rows per head: 13 tiles of 16, four of 64, two of 128, one of 256 (each set padded); the tilings the GPU tuner times; Lq != Lk,
        ragged blocks both sides."""
        q, k, key_mask = inputs(2, batch=1, lq=3300, lk=300, hq=2, hkv=1, dtype=self.dtype)
        config = baatt.BAConfig(block_size=16, block_size_k=32, selector="pooled_query", mask=CAUSAL)
        assert_close(*both(q, k, key_mask, config, interpret=self.interpret, row_tile=row_tile,
                           num_warps=num_warps), self.atol)

    def test_selector_takes_the_kernel(self):
        """log P through the kernel equals log P through XLA, NaN at a seen key included."""
        q, k, key_mask = inputs(3, dtype=self.dtype)
        config = baatt.BAConfig(block_size=32, sparsity=0.5, selector="pooled_query", mask=CAUSAL)
        run = lambda k, kernel: np.asarray(pooled_query.log_mass(q, k, config, key_mask=key_mask, kernel=kernel,
                                                                 interpret=self.interpret))
        assert_close(run(k, True), run(k, False), self.atol)
        poisoned = k.at[1, 40, 0, 3].set(jnp.nan)  # a real key: batch row 1 keeps its first 75 keys at least
        got, want = run(poisoned, True), run(poisoned, False)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[1]).any() and not np.isnan(got[0]).any()


class TestInterpret(_Suite):
    interpret = True


@pytest.mark.gpu
class TestGPU(_Suite):
    interpret = False
    dtype = jnp.bfloat16
    atol = 2e-2  # bf16 rows: the pooled mean is rounded once to bf16 for the kernel and not for XLA

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not baatt.platform.has_gpu():
            pytest.skip("needs a CUDA GPU")


def test_refuses_what_it_does_not_support():
    q, k, _ = inputs(4, d=32, holes=False)
    space = positional_space(q, k, baatt.BAConfig(block_size=16), None)
    rows, limits = pooled_query.pooled_rows(space)
    with pytest.raises(ValueError, match="head dim must be one of"):
        row_block_lse.row_block_logsumexp(rows, space.k, space.kv_valid, limits, scale=0.1, block_k=16,
                                          interpret=True)
    assert not pooled_query.use_kernel(space)
    q, k, _ = inputs(4, holes=False)
    space = positional_space(q, k, baatt.BAConfig(block_size=16), None)
    rows, limits = pooled_query.pooled_rows(space)
    for bad, rule in [(dict(row_tile=48), "row_tile must be a power of two >= 16"),
                      (dict(row_tile=8), "row_tile must be a power of two >= 16"),
                      (dict(num_warps=3), "num_warps must be one of")]:
        with pytest.raises(ValueError, match=rule):
            row_block_lse.row_block_logsumexp(rows, space.k, space.kv_valid, limits, scale=0.1, block_k=16,
                                              interpret=True, **bad)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_lowers_to_triton(monkeypatch):
    # Private hook (jax 0.11.2): the lowering asks the local GPU for its compute capability.
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability="9.0"))
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 4, 40, 128), jnp.bfloat16), sd((1, 2, 1024, 128), jnp.bfloat16), sd((1, 2, 1024), jnp.bool_),
            sd((1, 40), jnp.int32))
    fn = lambda r, k, valid, lim: row_block_lse.row_block_logsumexp(r, k, valid, lim, scale=0.1, block_k=128)
    triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(*args).mlir_module()
    assert "xla.gpu.triton" in module and "baatt_row_block_lse" in module
