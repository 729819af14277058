"""The budgeted block selection kernel (``baatt.kernels.pallas_triton.topk``) against the reference.

``TestTopBlocksInterpret`` runs the checks in Pallas interpret mode on the CPU;
``TestTopBlocksGPU`` compiles the same kernel through Triton on a CUDA GPU
(``gpu`` marker: skipped elsewhere). The reference is
``baatt.selection.budget.top_blocks_reference`` (XLA's ``top_k`` and a sort);
selections are integer ids, so every check is exact equality. Inputs are fresh
random scores, rounded to a coarse grid so that ties are common, with rows of
``-inf`` (empty key blocks), forced blocks (1e30) and signed zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import baatt
from baatt import platform
from baatt.kernels.pallas_triton import topk
from baatt.selection import budget


def make_priority(seed, lead, nk, kmax, *, grid=0.5):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(lead + (nk,)).astype(np.float32)
    if grid:
        p = np.round(p / grid) * grid  # ties, and -0.0 beside +0.0
    flat = p.reshape(-1, nk)
    flat[rng.random(flat.shape) < 0.1] = -np.inf
    flat[0] = -np.inf  # a row with no valid key block
    if flat.shape[0] > 1:
        flat[1, rng.integers(nk, size=min(3, nk))] = 1e30  # forced blocks
    # Counts may exceed a row's finite entries: then -inf entries are kept by id, as top_k does.
    count = rng.integers(1, kmax + 1, size=flat.shape[0]).astype(np.int32)
    return jnp.asarray(p), jnp.asarray(count.reshape(lead))


class _Suite:
    interpret: bool

    def check(self, p, count, kmax):
        got = topk.top_blocks(p, count, kmax=kmax, interpret=self.interpret)
        want = budget.top_blocks_reference(p, count, kmax)
        assert got.dtype == jnp.int32 and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    @settings(max_examples=12, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), nk=st.integers(1, 300), frac=st.floats(0.01, 1.0),
           lead=st.sampled_from([(3,), (1, 2, 5), (2, 3, 4)]), grid=st.sampled_from([0.0, 0.5, 2.0]))
    def test_random_rows_match_reference(self, seed, nk, frac, lead, grid):
        kmax = max(1, min(nk, round(frac * nk)))
        self.check(*make_priority(seed, lead, nk, kmax, grid=grid), kmax)

    def test_power_of_two_rows_and_full_budget(self):
        # The common shapes (Nk a power of two) and kmax = Nk (every block kept).
        for nk, kmax in [(64, 7), (256, 26), (256, 256)]:
            self.check(*make_priority(nk, (2, 2, 8), nk, kmax), kmax)

    def test_all_ties_keep_the_lowest_ids(self):
        p = jnp.zeros((4, 50), jnp.float32)
        count = jnp.asarray([1, 7, 20, 20], jnp.int32)
        got = np.asarray(topk.top_blocks(p, count, kmax=20, interpret=self.interpret))
        for row, c in zip(got, [1, 7, 20, 20]):
            np.testing.assert_array_equal(row[:c], np.arange(c))
            assert np.all(row[c:] == c - 1)

    def test_select_from_scores_kernel_route(self):
        # The fixed-budget path of the selection with the kernel equals the XLA path, forced blocks included.
        rng = np.random.default_rng(7)
        scores = rng.standard_normal((1, 3, 6, 40)).astype(np.float32)
        scores[..., 5] = -np.inf
        forced = jnp.asarray(rng.random((1, 3, 6, 40)) < 0.05)
        cfg = baatt.BAConfig(block_size=16, sparsity=0.7)
        a = budget.select_from_scores(jnp.asarray(scores), cfg, forced=forced, kernel=True, interpret=self.interpret)
        b = budget.select_from_scores(jnp.asarray(scores), cfg, forced=forced, kernel=False)
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
        np.testing.assert_array_equal(np.asarray(a.counts), np.asarray(b.counts))

    def test_gradients_pass_around_the_selection(self):
        # The selection is discrete: differentiating through a model that selects (jax.grad of
        # baatt.attention) must treat the kept ids as constants on either route, never fail to linearise.
        x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 4, 24)), jnp.float32)
        cfg = baatt.BAConfig(block_size=16, sparsity=0.6)

        def kept_sum(x, kernel):
            sel = budget.select_from_scores(x * 2.0, cfg, kernel=kernel, interpret=self.interpret)
            return jnp.sum(jnp.take_along_axis(x, sel.indices, axis=-1) ** 2)

        g_kernel = jax.grad(kept_sum)(x, True)
        g_xla = jax.grad(kept_sum)(x, False)
        np.testing.assert_array_equal(np.asarray(g_kernel), np.asarray(g_xla))
        assert np.count_nonzero(np.asarray(g_kernel)) > 0


class TestTopBlocksInterpret(_Suite):
    interpret = True


@pytest.mark.gpu
class TestTopBlocksGPU(_Suite):
    interpret = False

    def test_long_rows_match_reference(self):
        # 128K tokens at block 128: 1024 key blocks per row, 50% and 90% sparsity.
        for kmax in (512, 102):
            self.check(*make_priority(kmax, (1, 4, 1024), 1024, kmax, grid=0.0), kmax)


def test_rejects_bad_input():
    p = jnp.zeros((2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"kmax must be in \[1, num_k_blocks=8\]; got 9"):
        topk.top_blocks(p, jnp.ones((2,), jnp.int32), kmax=9, interpret=True)
    with pytest.raises(ValueError, match=r"count must have shape \(2,\)"):
        topk.top_blocks(p, jnp.ones((3,), jnp.int32), kmax=4, interpret=True)
    with pytest.raises(ValueError, match=r"priority must be a floating-point array; got int32"):
        topk.top_blocks(p.astype(jnp.int32), jnp.ones((2,), jnp.int32), kmax=4, interpret=True)
    assert "at most 4096" in topk.unsupported_reason(5000, 10)


def test_default_route_off_the_gpu_is_xla():
    # On by default only where a CUDA GPU is present (see DEFAULT_ON_GPU); never on a machine without one.
    if not platform.has_gpu():
        assert not budget._use_top_blocks_kernel(256, 26)
