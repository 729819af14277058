"""The Pallas oracle map (``baatt.kernels.pallas_triton.oracle``) against the reference.

``TestOracleInterpret`` runs every check in Pallas interpret mode on the CPU;
``TestOracleGPU`` runs the same checks compiled through Triton on a CUDA GPU
(``gpu`` marker: skipped elsewhere). Inputs are fresh random arrays; the
reference is ``baatt.reference.post_downsample_map`` (float32 streaming,
``Precision.HIGHEST``), which upcasts bf16/f16 inputs exactly as the kernel's
tensor-core products do, so every dtype is held to a tight absolute tolerance
(``M_hat`` entries lie in [0, 1]).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baatt import layout, platform, reference
from baatt.kernels.pallas_triton import oracle
from baatt.reference import downsample as ref_ds


def make_inputs(seed, *, batch=1, lq=200, lk=None, q_heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
                padded=False):
    """q [B, Lq, Hq, D], k [B, Lk, Hkv, D] with uneven norms (so sorting matters) and an optional key mask."""
    rng = np.random.default_rng(seed)
    lk = lq if lk is None else lk
    q = rng.standard_normal((batch, lq, q_heads, head_dim)) * rng.gamma(2.0, 0.6, (batch, lq, q_heads, 1))
    k = rng.standard_normal((batch, lk, kv_heads, head_dim)) * rng.gamma(2.0, 0.6, (batch, lk, kv_heads, 1)) + 0.2
    mask = None
    if padded:
        lengths = rng.integers(1, lk + 1, size=batch)
        mask = np.arange(lk)[None, :] < lengths[:, None]
        mask &= rng.random((batch, lk)) > 0.15  # interior holes too: a key mask need not be a prefix
        mask[:, 0] = True
        mask = jnp.asarray(mask)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), mask


def check_map(got, want, atol):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.isfinite(got)), "non-finite entries in M_hat"
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    # Each row is a distribution over key blocks (every query block holds a real row here).
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=10 * atol)
    assert np.all(got >= 0)


class _Suite:
    interpret: bool

    @property
    def atol(self):
        # interpret: float32 math on the CPU, only summation order differs; GPU: exp2 approximation too.
        return 2e-6 if self.interpret else 5e-5

    def kernel_map(self, q, k, **kw):
        return oracle.post_downsample_map(q, k, interpret=self.interpret, **kw)

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(
        seed=st.integers(0, 2**31 - 1),
        lq=st.sampled_from([1, 37, 128, 250, 300]),
        lk=st.sampled_from([5, 64, 129, 300]),
        blocks=st.sampled_from([(16, 16), (32, 64), (64, 32), (128, 128), (16, 256)]),
        head_dim=st.sampled_from([64, 128]),
        gqa=st.sampled_from([1, 2]),
        batch=st.integers(1, 2),
        dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
        padded=st.booleans(),
        sort=st.sampled_from(["none", "q", "k", "qk"]),
    )
    def test_random_shapes_match_reference(self, seed, lq, lk, blocks, head_dim, gqa, batch, dtype, padded, sort):
        q, k, mask = make_inputs(seed, batch=batch, lq=lq, lk=lk, q_heads=2, kv_heads=2 // gqa, head_dim=head_dim,
                                 dtype=jnp.dtype(dtype), padded=padded)
        q_perm = reference.norm_sort(q)[0] if "q" in sort else None
        k_perm = reference.norm_sort(k, mask=mask)[0] if "k" in sort else None
        kw = dict(block_size=blocks[0], block_size_k=blocks[1], key_mask=mask, q_perm=q_perm, k_perm=k_perm)
        got = self.kernel_map(q, k, **kw)
        want = reference.post_downsample_map(q, k, **kw)
        check_map(got, want, self.atol)

    def test_lse_matches_reference(self):
        q, k, mask = make_inputs(1, batch=2, lq=250, lk=190, q_heads=4, kv_heads=2, padded=True)
        space = layout.to_block_space(q, k, None, block_q=64, block_k=32, key_mask=mask)
        scale = 1.0 / math.sqrt(q.shape[-1])
        got = oracle.row_logsumexp(space.q, space.k, space.kv_valid, scale=scale, block_q=64, block_k=32,
                                   interpret=self.interpret)
        want = ref_ds.row_logsumexp(space, scale)
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=20 * self.atol, rtol=0)

    def test_tiles_smaller_than_blocks(self):
        # Several query tiles per block (partials summed in XLA) and several key tiles per block (inner loop).
        q, k, mask = make_inputs(2, batch=1, lq=230, lk=260, q_heads=2, kv_heads=2, dtype=jnp.float32, padded=True)
        kw = dict(block_size=64, block_size_k=128, key_mask=mask)
        want = reference.post_downsample_map(q, k, **kw)
        for tuning in (oracle.Tuning(q=16, k=32), oracle.Tuning(q=32, k=128), oracle.Tuning(q=64, k=16)):
            check_map(self.kernel_map(q, k, tuning=tuning, **kw), want, self.atol)

    def test_scale_argument(self):
        q, k, _ = make_inputs(3, lq=128, dtype=jnp.float32)
        got = self.kernel_map(q, k, block_size=32, scale=0.3)
        check_map(got, reference.post_downsample_map(q, k, block_size=32, scale=0.3), self.atol)

    def test_nan_poisoned_padding_changes_nothing(self):
        q, k, mask = make_inputs(4, batch=2, lq=200, lk=170, q_heads=4, kv_heads=2, padded=True)
        clean = self.kernel_map(q, k, block_size=64, block_size_k=32, key_mask=mask)
        k_nan = jnp.where(mask[:, :, None, None], k, jnp.nan)
        dirty = self.kernel_map(q, k_nan, block_size=64, block_size_k=32, key_mask=mask)
        np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))
        # Block space: NaN in padded query rows and masked keys (+inf too) as well.
        space = layout.to_block_space(q, k, None, block_q=64, block_k=32, key_mask=mask)
        qv = space.q_valid[:, None, :, None]
        kv = space.kv_valid[..., None]
        args = dict(scale=0.125, block_q=64, block_k=32, interpret=self.interpret)
        base = oracle.post_downsample_blocked(space.q, space.k, space.kv_valid, space.q_valid, **args)
        qp = jnp.where(qv, space.q, jnp.nan)
        kp = jnp.where(kv, space.k, jnp.where(jnp.arange(space.k.shape[2])[:, None] % 2 == 0, jnp.nan, jnp.inf))
        poisoned = oracle.post_downsample_blocked(qp, kp, space.kv_valid, space.q_valid, **args)
        assert not np.any(np.isnan(np.asarray(poisoned))), "NaN leaked from poisoned padding"
        np.testing.assert_array_equal(np.asarray(base), np.asarray(poisoned))
        np.testing.assert_array_equal(np.asarray(base), np.asarray(clean))

    def test_rows_without_keys_are_zero(self):
        # Block space only (the public API refuses a batch row without real keys): kv head 1 of batch 1 empty.
        q, k, _ = make_inputs(5, batch=2, lq=96, q_heads=4, kv_heads=2, dtype=jnp.float32)
        space = layout.to_block_space(q, k, None, block_q=32, block_k=32)
        valid = space.kv_valid.at[1, 1].set(False)
        args = dict(scale=0.125, block_q=32, block_k=32, interpret=self.interpret)
        lse = np.asarray(oracle.row_logsumexp(space.q, space.k, valid, **args))
        assert np.all(np.isneginf(lse[1, 2:])) and np.all(np.isfinite(lse[0])) and np.all(np.isfinite(lse[1, :2]))
        m = np.asarray(oracle.post_downsample_blocked(space.q, space.k, valid, space.q_valid, **args))
        assert np.all(m[1, 2:] == 0)
        np.testing.assert_allclose(m[0].sum(-1), 1.0, atol=10 * self.atol)
        np.testing.assert_allclose(m[1, :2].sum(-1), 1.0, atol=10 * self.atol)


class TestOracleInterpret(_Suite):
    interpret = True


@pytest.mark.gpu
class TestOracleGPU(_Suite):
    interpret = False

    def test_long_sequence_matches_reference(self):
        q, k, mask = make_inputs(9, batch=1, lq=4000, lk=4100, q_heads=4, kv_heads=2, head_dim=128, padded=True)
        kw = dict(block_size=128, key_mask=mask, k_perm=reference.norm_sort(k, mask=mask)[0])
        check_map(self.kernel_map(q, k, **kw), reference.post_downsample_map(q, k, **kw), self.atol)


def test_oracle_selector_kernel_route_matches_reference_route():
    # The oracle selector's map through the kernel (interpret mode here, compiled on a GPU) equals the reference's.
    from baatt.selection import oracle as oracle_selector

    q, k, mask = make_inputs(13, batch=1, lq=300, q_heads=2, kv_heads=1, head_dim=64, dtype=jnp.float32, padded=True)
    space = layout.to_block_space(q, k, None, block_q=64, block_k=64, key_mask=mask,
                                  k_perm=reference.norm_sort(k, mask=mask)[0])
    on_gpu = platform.has_gpu()
    if on_gpu:
        got = oracle_selector.oracle_map(space, 0.125)  # default route: the kernel
    else:
        got = oracle.post_downsample_blocked(space.q, space.k, space.kv_valid, space.q_valid, scale=0.125,
                                             block_q=64, block_k=64, interpret=True)
    want = oracle_selector.oracle_map(space, 0.125, kernel=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


# ----------------------------------------------------------------------------- errors


def _qk(d=64, dtype=jnp.float32, lq=64, lk=64):
    return jnp.ones((1, lq, 2, d), dtype), jnp.ones((1, lk, 1, d), dtype)


@pytest.mark.parametrize("d", [32, 96, 256])
def test_unsupported_head_dim_raises(d):
    q, k = _qk(d=d)
    with pytest.raises(ValueError, match=r"head dim must be one of \(64, 128\).*got " + str(d)):
        oracle.post_downsample_map(q, k, block_size=32, interpret=True)


def test_unsupported_dtype_raises():
    # NumPy float64 passes the generic checks (no jax x64 needed) and must be refused by the kernel's rule.
    q, k = np.ones((1, 64, 2, 64)), np.ones((1, 64, 1, 64))
    with pytest.raises(ValueError, match=r"dtype must be bfloat16, float16 or float32.*float64"):
        oracle.post_downsample_map(q, k, block_size=32, interpret=True)


@pytest.mark.parametrize(("kw", "rule"), [
    (dict(block_size=8), r"block_q must be a power of two in \[16, 256\].*got 8"),
    (dict(block_size=48), r"block_q must be a power of two in \[16, 256\].*got 48"),
    (dict(block_size=32, block_size_k=512), r"block_k must be a power of two in \[16, 256\].*got 512"),
    (dict(block_size=0), r"block_size must be a positive int; got 0"),
    (dict(block_size=32, block_size_k=2.0), r"block_size_k must be a positive int; got 2.0"),
])
def test_unsupported_block_size_raises(kw, rule):
    q, k = _qk()
    with pytest.raises(ValueError, match=rule):
        oracle.post_downsample_map(q, k, interpret=True, **kw)


def test_generic_input_errors_raise():
    q, k = _qk()
    with pytest.raises(ValueError, match="kv heads must divide query heads"):
        oracle.post_downsample_map(k, q, block_size=32, interpret=True)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        oracle.post_downsample_map(q, k, block_size=32, key_mask=jnp.ones((1, 3), bool), interpret=True)


def test_tile_must_divide_block():
    q, k = _qk()
    with pytest.raises(ValueError, match="tile 24 must divide block size 32"):
        oracle.post_downsample_map(q, k, block_size=32, tuning=oracle.Tuning(q=24), interpret=True)


def test_without_gpu_asks_for_interpret():
    if platform.has_gpu():
        pytest.skip("a GPU is present")
    q, k = _qk()
    with pytest.raises(ValueError, match="interpret=True"):
        oracle.post_downsample_map(q, k, block_size=32)
