"""The Mosaic GPU (sm90) block-sparse kernel against the reference, and its dispatch rules.

``TestMosaicGPU`` runs the shared kernel checks of ``test_kernel_pallas``
(output, lse, dq/dk/dv vs the float32 reference with the low-precision error
budget; NaN poisoning; GQA; padding; ragged lengths; fully masked rows) on a
Hopper GPU (``gpu`` marker). The Mosaic GPU interpreter of jax 0.11.2 cannot
run wgmma (it fails lowering the kernel's wgmma pipeline effect), so there is
no interpret-mode twin; on the CPU the tests check that the dispatcher refuses
``mosaic_gpu`` with a reason and falls back, and ``test_kernel_mosaic_lowering.py``
lowers every kernel for sm90 without a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import baatt
from baatt import layout, platform
from baatt.kernels import mosaic_gpu
from baatt.kernels.mosaic_gpu import DEFAULT_BWD_TUNING, DEFAULT_TUNING, BwdTuning, Tuning
from baatt.reference.attention import block_sparse_blocked
from tests.test_kernel_pallas import check_against_reference, check_poison, fwd_and_grads, make_case, rel_err


def _kernel_fn(c, interpret, bwd=DEFAULT_BWD_TUNING, fwd=DEFAULT_TUNING):
    del interpret
    all_valid = bool(np.all(np.asarray(c["kv_valid"])))

    def f(q, k, v):
        return mosaic_gpu.block_sparse_attention(q, k, v, c["kv_valid"], c["indices"], c["counts"], scale=c["scale"],
                                                 block_q=c["block_q"], block_k=c["block_k"], all_valid=all_valid,
                                                 tuning=fwd, backward_tuning=bwd)
    return f


def _on_hopper() -> bool:
    return platform.hopper_reason() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")
class TestMosaicGPU:
    bwd = DEFAULT_BWD_TUNING  # the backward kernels under test
    fwd = DEFAULT_TUNING  # and the forward

    def kernel_fn(self, c, interpret):
        return _kernel_fn(c, interpret, bwd=self.bwd, fwd=self.fwd)

    def check(self, c):
        check_against_reference(c, False, make_kernel=self.kernel_fn)

    def test_bf16_gqa_padding_holes(self):
        self.check(make_case(1, q_heads=4, kv_heads=2, length=500, block_q=128, block_k=64, kmax=5, masked_frac=0.1))

    def test_portable_backward_option(self):
        c = make_case(13, q_heads=4, kv_heads=2, length=700, head_dim=64, block_q=128, block_k=128, kmax=3,
                      masked_frac=0.05)

        def make(c_, interpret):
            return lambda q, k, v: mosaic_gpu.block_sparse_attention(
                q, k, v, c_["kv_valid"], c_["indices"], c_["counts"], scale=c_["scale"], block_q=128, block_k=128,
                backward_impl="pallas")
        check_against_reference(c, False, make_kernel=make)

    def test_f16_head_dim_128(self):
        self.check(make_case(3, q_heads=2, kv_heads=1, length=512, head_dim=128, block_q=128, block_k=128,
                             dtype=jnp.float16))

    def test_all_valid_fast_path(self):
        c = make_case(2, batch=2, q_heads=4, kv_heads=1, length=1024, head_dim=128, block_q=128, block_k=128)
        assert bool(np.all(np.asarray(c["kv_valid"])))
        self.check(c)

    def test_block_q_256_block_k_256(self):
        self.check(make_case(8, q_heads=2, kv_heads=2, length=1024, head_dim=64, block_q=256, block_k=256, kmax=3))

    def test_single_selected_block(self):
        self.check(make_case(4, q_heads=2, kv_heads=1, length=400, block_q=128, block_k=128, single=True, pad_tail=30))

    def test_nan_poison(self):
        check_poison(make_case(5, q_heads=4, kv_heads=2, length=460, block_q=128, block_k=64, kmax=3,
                               masked_frac=0.1), False, make_kernel=self.kernel_fn)

    def test_nan_poison_all_valid(self):
        check_poison(make_case(9, q_heads=2, kv_heads=1, length=768, block_q=128, block_k=128, kmax=2),
                     False, make_kernel=self.kernel_fn)

    def test_fully_masked_rows_are_zero(self):
        c = make_case(6, q_heads=2, kv_heads=1, length=320, block_q=128, block_k=128, single=True)
        c["indices"] = c["indices"].at[0, 0, 0, :].set(2)  # block 2 holds keys 256..383: 320.. padding
        c["kv_valid"] = c["kv_valid"].at[0, 0, 256:].set(False)
        out, lse, grads = fwd_and_grads(self.kernel_fn(c, False), c, c["q"], c["k"], c["v"])
        assert np.all(np.asarray(out[0, 0, :128], np.float32) == 0)
        assert np.all(np.isneginf(np.asarray(lse[0, 0, :128])))
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
        self.check(c)

    def test_end_to_end_default_dispatch(self):
        rng = np.random.default_rng(7)
        b, l, hq, hkv, d = 1, 1000, 4, 2, 128
        q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))
        mask = jnp.asarray(np.arange(l)[None, :] < 950)
        cfg = baatt.BAConfig(block_size=128, sparsity=0.5)
        out_m, st_m = baatt.attention(q, k, v, config=cfg, key_mask=mask, return_stats=True)
        out_r, st_r = baatt.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                      config=cfg, key_mask=mask, implementation="reference", return_stats=True)
        assert st_m["implementation"] == "mosaic_gpu"
        assert rel_err(out_m, out_r) <= 2e-2
        np.testing.assert_array_equal(np.asarray(st_m["selection"].counts), np.asarray(st_r["selection"].counts))

    def test_positional_layout(self):
        # [B, L, H, D] in and out (no transposes): same checks, gradients included.
        self.check_positional(make_case(11, q_heads=4, kv_heads=2, length=768, head_dim=128, block_q=128,
                                        block_k=128, kmax=4))

    def test_positional_layout_block_256(self):
        self.check_positional(make_case(14, q_heads=2, kv_heads=1, length=1024, head_dim=64, block_q=256,
                                        block_k=256, kmax=3))

    def check_positional(self, c):
        hm = lambda x: jnp.swapaxes(x, 1, 2)

        def make(c_, interpret):
            def f(q, k, v):
                out, lse = mosaic_gpu.positional_attention(hm(q), hm(k), hm(v), c_["indices"], c_["counts"],
                                                           scale=c_["scale"], block_q=c_["block_q"],
                                                           block_k=c_["block_k"], tuning=self.fwd,
                                                           backward_tuning=self.bwd)
                return hm(out), lse
            return f
        check_against_reference(c, False, make_kernel=make)

    def test_end_to_end_positional_path_with_grads(self):
        rng = np.random.default_rng(12)
        b, l, hq, hkv, d = 1, 1024, 4, 2, 64
        q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))
        cfg = baatt.BAConfig(block_size=128, sparsity=0.7)
        cot = jnp.asarray(rng.standard_normal((b, l, hq, d)), jnp.float32)

        def loss(impl, q, k, v):
            return jnp.sum(baatt.attention(q, k, v, config=cfg, implementation=impl).astype(jnp.float32) * cot)
        f32 = lambda x: x.astype(jnp.float32)
        g_m = jax.grad(lambda *a: loss("mosaic_gpu", *a), argnums=(0, 1, 2))(q, k, v)
        g_r = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
        for a, r in zip(g_m, g_r):
            assert rel_err(a, r) <= 3e-2

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(
        seed=st.integers(0, 2**31 - 1),
        length=st.integers(100, 1200),
        blocks=st.sampled_from([(128, 64), (128, 128), (256, 128), (128, 256)]),
        head_dim=st.sampled_from([64, 128]),
        gqa=st.sampled_from([1, 2]),
        batch=st.integers(1, 2),
        dtype=st.sampled_from(["bfloat16", "float16"]),
    )
    def test_random_shapes(self, seed, length, blocks, head_dim, gqa, batch, dtype):
        c = make_case(seed, batch=batch, q_heads=2, kv_heads=2 // gqa, length=length, head_dim=head_dim,
                      block_q=blocks[0], block_k=blocks[1], dtype=jnp.dtype(dtype), kmax=4, masked_frac=0.05)
        self.check(c)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")
class TestMosaicGPUBackwardVariants:
    """The other backward settings: unrotated walks, warpgroups in turn, heads-fastest launch with a 3-deep
    ring (TestMosaicGPU runs the default on every case)."""

    @pytest.mark.parametrize("bwd", [BwdTuning(rotate=False), BwdTuning(pingpong=True),
                                     BwdTuning(tile_major=False, dkv_stages=3)])
    def test_gqa_masked_and_positional(self, bwd):
        c = make_case(15, q_heads=4, kv_heads=2, length=700, head_dim=128, block_q=128, block_k=128, kmax=4,
                      masked_frac=0.05)
        check_against_reference(c, False, make_kernel=functools.partial(_kernel_fn, bwd=bwd))
        c = make_case(16, q_heads=2, kv_heads=1, length=1024, head_dim=64, block_q=256, block_k=256, kmax=3)
        check_against_reference(c, False, make_kernel=functools.partial(_kernel_fn, bwd=bwd))
        suite = TestMosaicGPU()
        suite.bwd = bwd
        suite.test_positional_layout()


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")
class TestMosaicGPUBackwardWalks:
    """The default backward at head dim 128 on walks TestMosaicGPU runs at head dim 64 (masked GQA, mixed
    block sizes, poison, rows without keys, positional 256 blocks), on walks shorter than the K/V and Q/dO
    rings or empty, and run twice for bitwise-equal gradients. (Head dim 128 with f16, with every block
    kept and positional 128 blocks: TestMosaicGPU.)"""

    bwd = BwdTuning()
    fwd = DEFAULT_TUNING
    kernel_fn = TestMosaicGPU.kernel_fn
    check = TestMosaicGPU.check
    check_positional = TestMosaicGPU.check_positional

    def test_masked_gqa_padding_holes(self):
        self.check(make_case(31, q_heads=4, kv_heads=2, length=500, head_dim=128, block_q=128, block_k=128, kmax=5,
                             masked_frac=0.1))

    @pytest.mark.parametrize("blocks", [(256, 256), (256, 128), (128, 256)])
    def test_other_blocks(self, blocks):
        self.check(make_case(34, q_heads=2, kv_heads=1, length=1000, head_dim=128, block_q=blocks[0],
                             block_k=blocks[1], kmax=3, masked_frac=0.05))

    def test_nan_poison(self):
        check_poison(make_case(35, q_heads=4, kv_heads=2, length=460, head_dim=128, block_q=128, block_k=128, kmax=3,
                               masked_frac=0.1), False, make_kernel=self.kernel_fn)

    def test_fully_masked_rows_are_zero(self):
        c = make_case(36, q_heads=2, kv_heads=1, length=320, head_dim=128, block_q=128, block_k=128, single=True)
        c["indices"] = c["indices"].at[0, 0, 0, :].set(2)
        c["kv_valid"] = c["kv_valid"].at[0, 0, 256:].set(False)
        out, lse, grads = fwd_and_grads(self.kernel_fn(c, False), c, c["q"], c["k"], c["v"])
        assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
        assert np.all(np.asarray(grads[0][0, 0, :128], np.float32) == 0)  # rows without keys: dq = 0
        self.check(c)

    def test_positional_block_256(self):
        self.check_positional(make_case(37, q_heads=4, kv_heads=2, length=1024, head_dim=128, block_q=256,
                                        block_k=256, kmax=3))

    def test_walks_shorter_than_the_ring(self):
        # One selected block per row (a single step in dq; one or two in dk/dv), some key blocks chosen by
        # no row (empty dk/dv walks).
        self.check(make_case(38, q_heads=4, kv_heads=2, length=1024, head_dim=128, block_q=128, block_k=128,
                             kmax=1))

    def test_gradients_are_deterministic(self):
        c = make_case(39, q_heads=2, kv_heads=1, length=1024, head_dim=128, block_q=128, block_k=128)
        f = self.kernel_fn(c, False)
        g1 = fwd_and_grads(f, c, c["q"], c["k"], c["v"])[2]
        g2 = fwd_and_grads(f, c, c["q"], c["k"], c["v"])[2]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(g1, g2))


FORWARD_VARIANTS = [Tuning(persistent=True, ctas=3), Tuning(persistent=True, ctas=5, tile_major=False, rotate=False),
                    Tuning(persistent=True), Tuning(persistent=False)]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("fwd", FORWARD_VARIANTS, ids=["3ctas", "5ctas_heads_fastest", "one_per_sm", "one_per_item"])
class TestMosaicGPUForwardVariants:
    """Both forwards whatever the walk length (``TestMosaicGPU`` runs the derived choice: persistent on
    its short walks). Persistent with a few CTAs: each walks many work items of ragged length (zero-length
    ones too), so the K/V ring, the turn-taking and the double-buffered Q/output run on across items."""

    def suite(self, fwd):
        suite = TestMosaicGPU()
        suite.fwd = fwd
        return suite

    def test_masked_gqa_and_empty_rows(self, fwd):
        c = make_case(21, batch=2, q_heads=4, kv_heads=2, length=900, block_q=128, block_k=64, kmax=6,
                      masked_frac=0.1)
        c["counts"] = c["counts"].at[0, 1, 2].set(0).at[1, 3, :3].set(0)  # rows that see nothing
        out, lse, _ = fwd_and_grads(_kernel_fn(c, False, fwd=fwd), c, c["q"], c["k"], c["v"])
        assert np.all(np.asarray(out[0, 1, 256:384], np.float32) == 0) and np.all(np.isneginf(np.asarray(lse[1, 3, :384])))
        check_against_reference(c, False, make_kernel=functools.partial(_kernel_fn, fwd=fwd))

    def test_all_valid_many_items(self, fwd):
        # 2 x 8 x 12 = 192 work items: more than one per SM even with a CTA per SM.
        c = make_case(22, batch=2, q_heads=8, kv_heads=2, length=1536, head_dim=128, block_q=128, block_k=128,
                      kmax=5)
        check_against_reference(c, False, make_kernel=functools.partial(_kernel_fn, fwd=fwd))

    def test_blocks_256_and_positional(self, fwd):
        self.suite(fwd).test_block_q_256_block_k_256()
        self.suite(fwd).test_positional_layout()

    def test_nan_poison(self, fwd):
        self.suite(fwd).test_nan_poison()


CAUSAL = baatt.AttentionMask.causal()
MASKED_CASES = {
    # name: (mask, block_q, block_k, length_q, length_k, head_dim, selection, forward tuning)
    "causal_128_128": (CAUSAL, 128, 128, 700, 700, 128, "sparse", DEFAULT_TUNING),
    "causal_one_per_item": (CAUSAL, 128, 128, 700, 700, 128, "sparse", Tuning(persistent=False)),
    "causal_persistent_3ctas": (CAUSAL, 128, 128, 700, 700, 64, "sparse", Tuning(persistent=True, ctas=3)),
    "causal_256_128": (CAUSAL, 256, 128, 1000, 1000, 64, "sparse", DEFAULT_TUNING),
    "causal_128_256": (CAUSAL, 128, 256, 900, 900, 128, "sparse", DEFAULT_TUNING),
    "causal_128_64_portable_backward": (CAUSAL, 128, 64, 600, 600, 64, "sparse", DEFAULT_TUNING),
    "causal_keys_past_the_queries": (CAUSAL, 128, 128, 512, 700, 128, "sparse", DEFAULT_TUNING),
    "causal_hidden_blocks_too": (CAUSAL, 128, 128, 512, 512, 64, "all", DEFAULT_TUNING),
    "block_causal_128_128": (baatt.AttentionMask.block_causal(256), 128, 128, 800, 800, 128, "sparse",
                             DEFAULT_TUNING),
    "block_causal_256_256": (baatt.AttentionMask.block_causal(512), 256, 256, 1100, 1100, 64, "sparse",
                             DEFAULT_TUNING),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm90 (Hopper) GPU")
class TestMosaicGPUCausal:
    """Causal and block-causal masks: out, lse, dq/dk/dv against the float32 reference under the same mask
    (GQA, key padding, ragged lengths), and every block kept against ``jax.nn.dot_product_attention``."""

    @pytest.mark.parametrize("case", list(MASKED_CASES))
    def test_matches_reference_under_mask(self, case):
        mask, block_q, block_k, lq, lk, d, how, fwd = MASKED_CASES[case]
        rng = np.random.default_rng(len(case))
        b, hq, hkv = 2, 4, 2
        q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
                   for length, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        key_mask = jnp.asarray(np.arange(lk)[None, :] < np.array([lk, lk - 70])[:, None])
        cfg = baatt.BAConfig(block_size=block_q, block_size_k=block_k, sparsity=0.5, mask=mask)
        sel = baatt.select_blocks(q, k, cfg, key_mask=key_mask)
        indices, counts = sel.indices, sel.counts
        if how == "all":  # a list naming blocks the mask hides wholly: the kernels must still hide them
            nq, nk = -(-lq // block_q), -(-lk // block_k)
            indices = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (b, hq, nq, nk))
            counts = jnp.full((b, hq, nq), nk, jnp.int32)
        space = layout.to_block_space(q, k, v, block_q=block_q, block_k=block_k, key_mask=key_mask, mask=mask)
        scale = d ** -0.5
        cot = jnp.asarray(rng.standard_normal(space.q.shape), jnp.float32)

        def kernel(q, k, v):
            return mosaic_gpu.block_sparse_attention(q, k, v, space.kv_valid, indices, counts, scale=scale,
                                                     block_q=block_q, block_k=block_k, tuning=fwd, mask=mask)

        def ref(q, k, v):
            s = layout.BlockSpace(q, k, v, space.kv_valid, space.q_valid, block_q, block_k, mask=mask)
            return block_sparse_blocked(s, indices, counts, scale=scale)

        bf = lambda x: x.astype(jnp.bfloat16)
        c = {"cot": cot}
        out, lse, grads = fwd_and_grads(kernel, c, bf(space.q), bf(space.k), bf(space.v))
        f32 = lambda x: bf(x).astype(jnp.float32)
        r_out, r_lse, r_grads = fwd_and_grads(ref, c, f32(space.q), f32(space.k), f32(space.v))
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
        fin = np.isfinite(np.asarray(r_lse))
        np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=2e-2)
        for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
            assert np.all(np.isfinite(np.asarray(x, np.float32))), name
            assert rel_err(x, r) <= 2e-2, f"{name}: relative error {rel_err(x, r):.2e}"

    def test_positional_layout_under_causal_mask(self):
        rng = np.random.default_rng(41)
        b, length, hq, hkv, d, block = 1, 768, 4, 2, 128, 128
        q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))
        sel = baatt.select_blocks(q, k, baatt.BAConfig(block_size=block, sparsity=0.5), is_causal=True)
        cot = jnp.asarray(rng.standard_normal((b, length, hq, d)), jnp.float32)

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

        def ours(q, k, v):
            out, _ = mosaic_gpu.positional_attention(q, k, v, sel.indices, sel.counts, scale=d ** -0.5,
                                                     block_q=block, block_k=block, mask=CAUSAL)
            return out

        def theirs(q, k, v):  # the same blocks and the causal mask, densely, in float32
            kept = np.repeat(np.repeat(np.asarray(sel.kept_mask(length // block)), block, axis=2), block, axis=3)
            allowed = jnp.asarray(kept & np.tril(np.ones((length, length), bool)))
            f32 = lambda x: x.astype(jnp.float32)
            return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=allowed)

        got = jax.value_and_grad(functools.partial(loss, ours), argnums=(0, 1, 2))(q, k, v)[1]
        want = jax.value_and_grad(functools.partial(loss, theirs), argnums=(0, 1, 2))(q, k, v)[1]
        assert rel_err(ours(q, k, v), theirs(q, k, v)) <= 2e-2
        for x, r in zip(got, want):
            assert rel_err(x, r) <= 3e-2

    # 1000 tokens take the block-space path, 1024 (whole blocks) the positional one.
    @pytest.mark.parametrize("length", [1000, 1024])
    @pytest.mark.parametrize("mask", [CAUSAL, baatt.AttentionMask.block_causal(256)], ids=["causal", "block256"])
    def test_every_block_kept_equals_jax_nn(self, mask, length):
        rng = np.random.default_rng(42)
        b, hq, hkv, d = 2, 4, 2, 64
        q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))
        cfg = baatt.BAConfig(block_size=128, mask=mask)
        cot = jnp.asarray(rng.standard_normal((b, length, hq, d)), jnp.float32)
        allowed = jnp.asarray(mask.token_mask(length, length))[None, None]
        f32 = lambda x: x.astype(jnp.float32)

        def ours(q, k, v):
            return baatt.attention(q, k, v, config=cfg, implementation="mosaic_gpu").astype(jnp.float32)

        def theirs(q, k, v):
            if mask == CAUSAL:
                return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), is_causal=True)
            return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), mask=allowed)

        _, stats = baatt.attention(q, k, v, config=cfg, return_stats=True)
        assert stats["implementation"] == "mosaic_gpu"
        assert rel_err(ours(q, k, v), theirs(q, k, v)) <= 2e-2
        got = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(lambda *a: jnp.sum(theirs(*a) * cot), argnums=(0, 1, 2))(q, k, v)
        for x, r in zip(got, want):
            assert rel_err(x, r) <= 3e-2


# ----------------------------------------------------------------------------- dispatch (any machine)


def _qkv(d=64, dtype=jnp.bfloat16, l=256):
    x = jnp.ones((1, l, 2, d), dtype)
    return x, x, x


def test_registered_with_top_priority():
    assert baatt.api.implementations()[0] == "mosaic_gpu"


def test_interpret_is_refused_with_reason():
    q, k, v = _qkv()
    reason = mosaic_gpu.why_unavailable(q, k, v, baatt.BAConfig(block_size=128), True)
    assert reason is not None and "interpret" in reason
    with pytest.raises(baatt.ImplementationUnavailable, match="mosaic_gpu: interpret mode is not offered"):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=128), implementation="mosaic_gpu", interpret=True)


@pytest.mark.skipif(_on_hopper(), reason="checks the refusal off Hopper")
def test_off_hopper_refused_and_default_falls_back():
    q, k, v = _qkv()
    with pytest.raises(baatt.ImplementationUnavailable, match="mosaic_gpu: .*sm90"):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=128), implementation="mosaic_gpu")
    # Every reason, not just the first: interpret mode and the missing Hopper GPU.
    reason = mosaic_gpu.why_unavailable(q, k, v, baatt.BAConfig(block_size=128), True)
    assert "interpret" in reason and platform.hopper_reason() in reason
    _, stats = baatt.attention(q, k, v, config=baatt.BAConfig(block_size=128), return_stats=True)
    assert stats["implementation"] != "mosaic_gpu"


@pytest.mark.parametrize(
    ("shape_d", "dtype", "block", "match"),
    [
        (96, jnp.bfloat16, 128, "head dim must be one of"),
        (64, jnp.float32, 128, "dtype must be bfloat16 or float16"),
        (64, jnp.bfloat16, 64, "block_q must be one of"),
    ],
)
def test_unsupported_reasons(shape_d, dtype, block, match):
    x = jnp.ones((1, 2, 256, shape_d), dtype)
    assert match in mosaic_gpu.unsupported_reason(x.shape, x.shape, x.shape, dtype, block, block)


def test_supported_shapes_have_no_reason():
    x = jnp.ones((1, 2, 256, 128), jnp.bfloat16)
    for bq in (128, 256):
        for bk in (64, 128, 256):
            assert mosaic_gpu.unsupported_reason(x.shape, x.shape, x.shape, jnp.bfloat16, bq, bk) is None


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tuning", [Tuning(persistent=False), Tuning(persistent=True, ctas=3)],
                         ids=["one_per_tile", "persistent"])
def test_kernel_body_traces(positional, masked, tuning):
    # Builds the kernel's jaxpr on any machine (the GPU tests compile and run it).
    from baatt.kernels.mosaic_gpu import forward
    b, hq, hkv, d, l = 1, 4, 2, 128, 512
    shape_q, shape_k = ((b, l, hq, d), (b, l, hkv, d)) if positional else ((b, hq, l, d), (b, hkv, l, d))
    q, k = jnp.zeros(shape_q, jnp.bfloat16), jnp.zeros(shape_k, jnp.bfloat16)
    for bq, bk in ((128, 128), (256, 64), (128, 256)):
        sel = mosaic_gpu.pack_selection(jnp.zeros((b, hq, l // bq, 2), jnp.int32), jnp.ones((b, hq, l // bq), jnp.int32))
        bias = jnp.zeros((b, hkv, l), jnp.float32) if masked else None
        jaxpr = jax.make_jaxpr(lambda q, k, s, bi, bq=bq, bk=bk: forward(q, k, k, s, bi, scale=0.1, block_q=bq, block_k=bk,
                                                           positional=positional, tuning=tuning))(q, k, sel, bias)
        assert "wgmma" in str(jaxpr) and "baatt_block_sparse_fwd" in str(jaxpr)


def test_forward_picks_persistent_from_the_walk_length():
    # The default tuning reads the selection's width: persistent (a 1-D grid of CTAs over work items)
    # up to PERSISTENT_MAX_STEPS tiles a row, one CTA per query tile beyond.
    from baatt.kernels.mosaic_gpu import PERSISTENT_MAX_STEPS, forward
    b, h, d = 1, 2, 64
    for kmax, persistent in ((2, True), (PERSISTENT_MAX_STEPS, True), (PERSISTENT_MAX_STEPS + 1, False)):
        l = 128 * (PERSISTENT_MAX_STEPS + 1)
        x = jax.ShapeDtypeStruct((b, h, l, d), jnp.bfloat16)
        sel = jax.ShapeDtypeStruct((b, h, l // 128, 1 + kmax), jnp.int32)
        jaxpr = str(jax.make_jaxpr(lambda q, s: forward(q, q, q, s, None, scale=0.1, block_q=128, block_k=128))(x, sel))
        assert ("grid_names=('baatt_cta',)" in jaxpr) == persistent, kmax


@pytest.mark.parametrize("positional", [False, True])
def test_backward_kernels_trace(positional):
    from baatt.kernels.mosaic_gpu import backward
    b, hq, hkv, d, l = 1, 4, 2, 128, 512
    shape_q, shape_k = ((b, l, hq, d), (b, l, hkv, d)) if positional else ((b, hq, l, d), (b, hkv, l, d))
    q, k = jnp.zeros(shape_q, jnp.bfloat16), jnp.zeros(shape_k, jnp.bfloat16)
    lse = jnp.zeros((b, hq, l), jnp.float32)
    for masked in ([False] if positional else [False, True]):
        bias = jnp.zeros((b, hkv, l), jnp.float32) if masked else None
        for bq, bk in ((128, 128), (256, 256)):
            idx, cnt = jnp.zeros((b, hq, l // bq, 2), jnp.int32), jnp.ones((b, hq, l // bq), jnp.int32)
            bwd = functools.partial(backward, bias=bias, indices=idx, counts=cnt, dlse=None, scale=0.1, block_q=bq,
                                    block_k=bk, positional=positional)
            jaxpr = str(jax.make_jaxpr(lambda q, k, o, l_, do, f=bwd: f(q, k, k, out=o, lse=l_, do=do))(q, k, q, lse, q))
            assert "wgmma" in jaxpr
            # a dq kernel and a dk/dv kernel, named for profilers (ncu --kernel-name regex:baatt_)
            assert "'baatt_q_tile'" in jaxpr and "'baatt_k_tile'" in jaxpr
            assert "baatt_block_sparse_dq" in jaxpr and "baatt_block_sparse_dkv" in jaxpr


def test_backward_impl_is_checked():
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    idx, cnt = jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError, match="backward_impl must be one of"):
        mosaic_gpu.positional_attention(x, x, x, idx, cnt, scale=0.1, block_q=128, block_k=128, backward_impl="cuda")


def test_tuning_resolution_fits_shared_memory():
    for d in (64, 128):
        for bk in (64, 128, 256):
            t = mosaic_gpu.Tuning().resolve(bk, d, 2)
            assert t.tile_k in (64, 128) and bk % t.tile_k == 0 and t.stages >= 2
            assert mosaic_gpu.Tuning(persistent=True).resolve(bk, d, 2).stages >= 2
    with pytest.raises(ValueError, match="Tuning.tile_k"):
        mosaic_gpu.Tuning(tile_k=32).resolve(128, 128, 2)
    with pytest.raises(ValueError, match="shared memory"):
        mosaic_gpu.Tuning(stages=8).resolve(128, 128, 2)
    # Persistent: the double-buffered Q still leaves a ring of two K/V stages at head dim 128.
    assert mosaic_gpu.Tuning(persistent=True).resolve(128, 128, 2).stages == 2
    with pytest.raises(ValueError, match="Tuning.ctas"):
        mosaic_gpu.Tuning(persistent=False, ctas=4).resolve(128, 128, 2)
    # Derived: persistent on walks of at most PERSISTENT_MAX_STEPS tiles (block_k 256 walks 2 tiles a block).
    limit = mosaic_gpu.PERSISTENT_MAX_STEPS
    assert mosaic_gpu.Tuning().resolve(128, 128, 2, kmax=limit).persistent is True
    assert mosaic_gpu.Tuning().resolve(128, 128, 2, kmax=limit + 1).persistent is False
    assert mosaic_gpu.Tuning().resolve(256, 128, 2, kmax=limit // 2 + 1).persistent is False
    assert mosaic_gpu.Tuning().resolve(128, 128, 2).persistent is False
    assert mosaic_gpu.Tuning(persistent=False).resolve(128, 128, 2, kmax=4).persistent is False
    with pytest.raises(ValueError, match="Tuning.ctas"):
        mosaic_gpu.Tuning(persistent=True, ctas=0).resolve(128, 128, 2)


@pytest.mark.parametrize("mask", [CAUSAL, baatt.AttentionMask.block_causal(256)], ids=["causal", "block256"])
def test_causal_masks_are_not_a_reason(mask):
    q, k, v = _qkv(d=128)
    reason = mosaic_gpu.why_unavailable(q, k, v, baatt.BAConfig(block_size=128, mask=mask), False)
    assert reason == platform.hopper_reason()


def test_mask_argument_is_checked():
    x = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)
    idx, cnt = jnp.zeros((1, 2, 4, 1), jnp.int32), jnp.ones((1, 2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"generation_block \(192\) must be a multiple"):
        mosaic_gpu.positional_attention(x, x, x, idx, cnt, scale=0.1, block_q=128, block_k=128,
                                        mask=baatt.AttentionMask.block_causal(192))
    with pytest.raises(ValueError, match="mask must be a baatt.AttentionMask"):
        mosaic_gpu.positional_attention(x, x, x, idx, cnt, scale=0.1, block_q=128, block_k=128, mask="causal")
