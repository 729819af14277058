"""Causal and block-causal attention through the whole pipeline.

References against the NumPy brute force (``tests/bruteforce.py``, ``span`` rule),
the selectors and the budget under a mask, the Pallas kernels (interpret mode)
against the reference, ``baatt.attention`` against ``jax.nn.dot_product_attention``
with every block kept, NaN in keys no query may see, and the bad-input errors.
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
from baatt import AttentionMask, layout, reference
from baatt.kernels import mosaic_gpu
from baatt.kernels.pallas_triton import Tuning, block_sparse_attention, oracle
from baatt.reference import error
from baatt.reference.attention import block_sparse_blocked
from baatt.selection import block_map, select_blocks
from baatt.selection.budget import forced_blocks, select_from_scores
from baatt.selection.estimator import estimate
from tests import bruteforce as bf

CAUSAL = AttentionMask.causal()
BLOCK16 = AttentionMask.block_causal(16)
SPANS = {CAUSAL: 1, BLOCK16: 16}
# the selectors every masked-budget check runs over (the token-level ones have their own NumPy checks too)
BUILT_IN = ["baatt", "meanpool", "oracle", "xattention", "last_query", "sparge_like", "random", "dense", "pooled_query"]


def qkv(seed=0, *, batch=2, lq=50, lk=None, hq=4, hkv=2, d=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    lk = lq if lk is None else lk
    q = rng.standard_normal((batch, lq, hq, d))
    k = 1.5 * rng.standard_normal((batch, lk, hkv, d))
    v = rng.standard_normal((batch, lk, hkv, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def padding(batch, length, real):
    """bool [B, L]: the first ``real[b]`` keys of row b are real."""
    return jnp.asarray(np.arange(length)[None, :] < np.asarray(real)[:, None])


def token_mask(mask, lq, lk):
    return jnp.asarray(mask.token_mask(lq, lk))


# ----------------------------------------------------------------------------- the mask itself


def test_mask_rule_and_block_pairs():
    tm = CAUSAL.token_mask(3, 5)
    np.testing.assert_array_equal(tm, np.tril(np.ones((3, 5), bool)))  # top-left, as jax.nn
    tm = BLOCK16.token_mask(40, 40)
    assert tm[15, 15] and tm[0, 15] and not tm[15, 16] and tm[16, 31] and not tm[31, 32]
    allowed, whole = CAUSAL.block_pairs(40, 40, 16, 8)
    assert allowed[0].tolist() == [True, True, False, False, False]
    assert whole[1].tolist() == [True, True, False, False, False]  # rows 16..31 see keys 0..15 whole
    assert CAUSAL.visible_keys(4, 6).tolist() == [True] * 4 + [False] * 2
    assert CAUSAL.visible_keys(6, 4) is None and AttentionMask().visible_keys(4, 6) is None


# ----------------------------------------------------------------------------- references vs brute force


@pytest.mark.parametrize("mask", [CAUSAL, BLOCK16], ids=["causal", "block16"])
@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 72), (72, 40)])
def test_dense_reference_matches_bruteforce(mask, lq, lk):
    q, k, v = qkv(1, lq=lq, lk=lk)
    km = padding(2, lk, [lk, lk - 7])
    out, lse = reference.dense_attention(q, k, v, key_mask=km, mask=mask)
    want, want_lse = bf.dense(q, k, v, mask=np.asarray(km), span=SPANS[mask])
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5)


@pytest.mark.parametrize("lq,lk", [(50, 50), (40, 72), (72, 40)])
def test_dense_reference_matches_jax_nn(lq, lk):
    q, k, v = qkv(2, lq=lq, lk=lk)
    out, _ = reference.dense_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("mask", [CAUSAL, BLOCK16], ids=["causal", "block16"])
def test_block_sparse_reference_and_oracle_map_match_bruteforce(mask):
    q, k, v = qkv(3, lq=60)
    km = padding(2, 60, [60, 45])
    cfg = baatt.BAConfig(block_size=16, block_size_k=8 if mask == CAUSAL else 16, sparsity=0.5, mask=mask)
    sel = select_blocks(q, k, cfg, key_mask=km)
    assert sel.mask == mask
    out, lse = reference.block_sparse_attention(q, k, v, sel, key_mask=km)
    want, want_lse = bf.block_sparse(q, k, v, np.asarray(sel.indices), np.asarray(sel.counts), cfg.block_q,
                                     cfg.block_k, mask=np.asarray(km), span=SPANS[mask])
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5)
    m_hat = reference.post_downsample_map(q, k, block_size=cfg.block_q, block_size_k=cfg.block_k, key_mask=km,
                                          mask=mask)
    want_map = bf.post_map(q, k, cfg.block_q, cfg.block_k, mask=np.asarray(km), span=SPANS[mask])
    np.testing.assert_allclose(m_hat, want_map, atol=1e-5)
    np.testing.assert_allclose(np.sum(m_hat, -1), 1.0, atol=1e-5)


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 8), (8, 16)])
def test_pre_scores_and_estimator_match_bruteforce(block_q, block_k):
    q, k, _ = qkv(4, lq=45, lk=45)
    km = padding(2, 45, [45, 38])
    cfg = baatt.BAConfig(block_size=block_q, block_size_k=block_k, compensate=True, beta=0.5, mask=CAUSAL)
    ref = reference.pre_downsample_scores(q, k, cfg, key_mask=km)
    want = bf.pre_scores(q, k, block_q, block_k, mask=np.asarray(km), beta=0.5, span=1)
    np.testing.assert_array_equal(np.isneginf(ref), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(ref)[fin], want[fin], atol=2e-5)
    fast = estimate(q, k, cfg, key_mask=km).scores
    np.testing.assert_array_equal(np.isneginf(fast), np.isneginf(want))
    np.testing.assert_allclose(np.asarray(fast)[fin], want[fin], atol=2e-5)


def test_block_causal_scores_are_pooled_scores_on_allowed_pairs():
    q, k, _ = qkv(5, lq=64)
    cfg = baatt.BAConfig(block_size=16, mask=BLOCK16.block_causal(32))
    scores = np.asarray(estimate(q, k, cfg).scores)
    plain = np.asarray(estimate(q, k, cfg.replace(mask="bidirectional")).scores)
    allowed = cfg.mask.block_pairs(64, 64, 16, 16)[0]
    np.testing.assert_array_equal(np.isneginf(scores), np.broadcast_to(~allowed, scores.shape))
    np.testing.assert_allclose(scores[..., allowed], plain[..., allowed], rtol=1e-6)


def test_metrics_under_the_mask():
    q, k, v = qkv(6, lq=64)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, mask=CAUSAL)
    sel = select_blocks(q, k, cfg)
    m_hat = reference.post_downsample_map(q, k, block_size=16, mask=sel.mask)
    dense_sel = select_blocks(q, k, cfg.replace(sparsity=None))
    np.testing.assert_allclose(error.selected_mass(m_hat, dense_sel), 1.0, atol=1e-5)
    recall = np.asarray(error.oracle_recall(m_hat, sel))
    assert np.all((recall > 0) & (recall <= 1 + 1e-6))
    u = error.bound(q, k, block_size=16, mask=CAUSAL)
    dev = error.logit_deviation(q, k, block_size=16, mask=CAUSAL)
    hidden = ~CAUSAL.block_pairs(64, 64, 16, 16)[0]
    assert np.all(np.asarray(dev) <= np.asarray(u) + 1e-5)
    assert np.all(np.asarray(u)[..., hidden] == 0) and np.all(np.asarray(dev)[..., hidden] == 0)


# ----------------------------------------------------------------------------- selection under a mask


def _budget(sparsity, n):
    return math.ceil(round((1 - sparsity) * n, 9))


@pytest.mark.parametrize("selector", BUILT_IN)
@pytest.mark.parametrize("mask", [CAUSAL, BLOCK16], ids=["causal", "block16"])
def test_selectors_keep_only_allowed_blocks_at_the_masked_budget(selector, mask):
    q, k, _ = qkv(7, lq=100, hq=2, hkv=1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.6, selector=selector, mask=mask, xattn_stride=4)
    sel = select_blocks(q, k, cfg)
    allowed, whole = mask.block_pairs(100, 100, 16, 16)
    kept = np.asarray(sel.kept_mask(allowed.shape[1]))
    assert not np.any(kept & ~allowed), "a block pair the mask hides was kept"
    n_valid = allowed.sum(-1)
    want = n_valid if selector == "dense" else np.array([_budget(0.6, n) for n in n_valid])
    if mask == CAUSAL:
        diagonal = allowed & ~whole
        assert np.all(kept[..., diagonal]), "a diagonal block was dropped"
        want = np.maximum(want, diagonal.sum(-1))
    np.testing.assert_array_equal(np.asarray(sel.counts), np.broadcast_to(want, sel.counts.shape))
    m = np.asarray(block_map(q, k, cfg))
    assert np.all(m[..., ~allowed] == 0)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)


def test_tau_budget_counts_mass_over_allowed_blocks_only():
    q, k, _ = qkv(8, lq=96)
    cfg = baatt.BAConfig(block_size=16, tau=0.999, mask=CAUSAL)
    sel = select_blocks(q, k, cfg)
    allowed = CAUSAL.block_pairs(96, 96, 16, 16)[0]
    kept = np.asarray(sel.kept_mask(6))
    assert not np.any(kept & ~allowed)
    assert np.all(np.asarray(sel.counts) <= allowed.sum(-1))


def test_top_blocks_kernel_honours_the_mask():
    q, k, _ = qkv(9, lq=128)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.7, mask=CAUSAL, local_window=1)
    scores = estimate(q, k, cfg).scores
    forced = forced_blocks(cfg, length_q=128, length_k=128, k_perm=None, q_heads=q.shape[2])
    kernel = select_from_scores(scores, cfg, forced=forced, kernel=True, interpret=True)
    plain = select_from_scores(scores, cfg, forced=forced, kernel=False)
    np.testing.assert_array_equal(kernel.indices, plain.indices)
    np.testing.assert_array_equal(kernel.counts, plain.counts)


# ----------------------------------------------------------------------------- Pallas kernels (interpret)


def _block_space(q, k, v, *, block_q, block_k, key_mask, mask):
    return layout.to_block_space(q, k, v, block_q=block_q, block_k=block_k, key_mask=key_mask, mask=mask)


def _fwd_and_grads(fn, q, k, v, cot):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads


KERNEL_CASES = {
    # name: (mask, block_q, block_k, length_q, length_k, tuning, selection)
    "causal_square": (CAUSAL, 32, 32, 160, 160, Tuning(), "sparse"),
    "causal_q2k": (CAUSAL, 64, 32, 150, 150, Tuning(fwd_q=32, dq_q=16, dq_k=16, dkv_k=16, dkv_q=32), "sparse"),
    "causal_k2q_cross": (CAUSAL, 32, 64, 96, 160, Tuning(dkv_k=32, dkv_q=16), "sparse"),
    "causal_every_block": (CAUSAL, 32, 32, 128, 96, Tuning(fwd_k=16), "every"),
    "causal_hidden_blocks_too": (CAUSAL, 32, 32, 128, 128, Tuning(), "all"),
    "block_causal": (AttentionMask.block_causal(64), 32, 16, 150, 150, Tuning(), "sparse"),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_pallas_kernel_matches_reference_under_mask(case):
    mask, block_q, block_k, lq, lk, tuning, how = KERNEL_CASES[case]
    q, k, v = qkv(10, batch=2, lq=lq, lk=lk, hq=4, hkv=2, d=64)
    km = padding(2, lk, [lk, lk - 21])
    cfg = baatt.BAConfig(block_size=block_q, block_size_k=block_k, sparsity=0.5 if how == "sparse" else None,
                         mask=mask)
    sel = select_blocks(q, k, cfg, key_mask=km)
    indices, counts = sel.indices, sel.counts
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    if how == "all":  # a hand-made list that also names hidden blocks: the kernel must still hide them
        indices = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (2, 4, nq, nk))
        counts = jnp.full((2, 4, nq), nk, jnp.int32)
    space = _block_space(q, k, v, block_q=block_q, block_k=block_k, key_mask=km, mask=mask)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(space.q.shape), jnp.float32)
    scale = 1 / 8

    def kernel(q, k, v):
        return block_sparse_attention(q, k, v, space.kv_valid, indices, counts, scale=scale, block_q=block_q,
                                      block_k=block_k, tuning=tuning, interpret=True, mask=mask)

    def ref(q, k, v):
        s = layout.BlockSpace(q, k, v, space.kv_valid, space.q_valid, block_q, block_k, mask=mask)
        return block_sparse_blocked(s, indices, counts, scale=scale)

    got = _fwd_and_grads(kernel, space.q, space.k, space.v, cot)
    want = _fwd_and_grads(ref, space.q, space.k, space.v, cot)
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    fin = np.isfinite(np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(got[1])[fin], np.asarray(want[1])[fin], atol=2e-5)
    for name, x, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[2]), (want[0], *want[2])):
        np.testing.assert_allclose(x, r, atol=3e-5, rtol=1e-4, err_msg=name)


def test_pallas_kernel_k_nan_past_the_diagonal_stays_out():
    """NaN in K at a key blocks a query tile would see only past the diagonal: rows before it are clean."""
    q, k, v = qkv(11, batch=1, lq=128, hq=2, hkv=1, d=64)
    bad = 70  # inside the diagonal tile of query block 2 (rows 64..95)
    sel = select_blocks(q, k, baatt.BAConfig(block_size=32, mask=CAUSAL))

    def run(k):
        space = _block_space(q, k, v, block_q=32, block_k=32, key_mask=None, mask=CAUSAL)
        return block_sparse_attention(space.q, space.k, space.v, space.kv_valid, sel.indices, sel.counts,
                                      scale=1 / 8, block_q=32, block_k=32, interpret=True, mask=CAUSAL)

    clean, dirty = run(k), run(k.at[:, bad].set(jnp.nan))
    for x, y in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(x)[:, :, :bad], np.asarray(y)[:, :, :bad])


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("mask", [CAUSAL, AttentionMask.block_causal(128)], ids=["causal", "block128"])
def test_pallas_kernels_lower_to_triton_under_mask(mask, monkeypatch):
    """The forward, dq and dk/dv kernels (and the oracle's) lower to Triton IR for sm90 on any machine."""
    # Private hook (jax 0.11.2): the lowering asks the local GPU for its compute capability.
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability="9.0"))
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 4, 512, 64), jnp.bfloat16), sd((1, 2, 512, 64), jnp.bfloat16), sd((1, 2, 512, 64), jnp.bfloat16),
            sd((1, 2, 512), jnp.bool_), sd((1, 4, 4, 3), jnp.int32), sd((1, 4, 4), jnp.int32))

    def grads(q, k, v, valid, idx, cnt):
        attend = lambda q, k, v: block_sparse_attention(q, k, v, valid, idx, cnt, scale=0.1, block_q=128,
                                                        block_k=64, tuning=Tuning(fwd_q=64, dq_q=32), mask=mask)
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)[0].astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    def oracle_map(q, k, v, valid, idx, cnt):
        return oracle.post_downsample_blocked(q, k, valid, jnp.ones((1, 512), bool), scale=0.1, block_q=128,
                                              block_k=64, mask=mask)

    triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for fn in (grads, oracle_map):
        module = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(*args).mlir_module()
        assert "xla.gpu.triton" in module


def test_oracle_kernel_matches_reference_under_mask():
    q, k, _ = qkv(12, batch=1, lq=100, hq=2, hkv=1, d=64)
    km = padding(1, 100, [90])
    for mask, bq, bk in ((CAUSAL, 32, 16), (AttentionMask.block_causal(32), 32, 32)):
        got = oracle.post_downsample_map(q, k, block_size=bq, block_size_k=bk, key_mask=km, mask=mask,
                                         tuning=oracle.Tuning(q=16, k=16), interpret=True)
        want = reference.post_downsample_map(q, k, block_size=bq, block_size_k=bk, key_mask=km, mask=mask)
        np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- baatt.attention, end to end


def _block_causal_nn(q, k, v, generation_block):
    tm = token_mask(AttentionMask.block_causal(generation_block), q.shape[1], k.shape[1])
    return jax.nn.dot_product_attention(q, k, v, mask=tm[None, None])


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_every_block_kept_equals_jax_nn_causal_with_gradients(implementation):
    q, k, v = qkv(13, batch=2, lq=96, lk=96, hq=4, hkv=2, d=64)
    cfg = baatt.BAConfig(block_size=32, block_size_k=16)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def ours(q, k, v):
        return jnp.sum(baatt.attention(q, k, v, config=cfg, is_causal=True, implementation=implementation,
                                       interpret=True) * cot)

    def theirs(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True) * cot)

    got = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(theirs, argnums=(0, 1, 2))(q, k, v)
    out = baatt.attention(q, k, v, config=cfg, is_causal=True, implementation=implementation, interpret=True)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    for x, r in zip(got[1], want[1]):
        np.testing.assert_allclose(x, r, atol=1e-5)


def test_every_block_kept_equals_jax_nn_block_causal():
    q, k, v = qkv(14, batch=1, lq=128, hq=2, hkv=2, d=64)
    cfg = baatt.BAConfig(block_size=32, mask=AttentionMask.block_causal(64))
    for implementation in ("reference", "pallas"):
        out = baatt.attention(q, k, v, config=cfg, implementation=implementation, interpret=True)
        np.testing.assert_allclose(out, _block_causal_nn(q, k, v, 64), atol=1e-5)


def test_cross_lengths_follow_jax_nn_top_left_alignment():
    for lq, lk in ((64, 100), (100, 64)):
        q, k, v = qkv(15, batch=1, lq=lq, lk=lk, d=64)
        out = baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16), is_causal=True)
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_nan_in_keys_no_query_sees_reaches_nothing(implementation):
    """Lk > Lq: under the top-left causal mask the keys past the last query are never seen."""
    q, k, v = qkv(16, batch=1, lq=72, lk=128, hq=2, hkv=1, d=64)
    k, v = k.at[:, 72:].set(jnp.nan), v.at[:, 72:].set(jnp.nan)
    cfg = baatt.BAConfig(block_size=32, block_size_k=16, sparsity=0.3)

    def loss(q, k, v):
        return jnp.sum(baatt.attention(q, k, v, config=cfg, is_causal=True, implementation=implementation,
                                       interpret=True) ** 2)

    out = baatt.attention(q, k, v, config=cfg, is_causal=True, implementation=implementation, interpret=True)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.all(np.isfinite(out))
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[1])[:, 72:] == 0) and np.all(np.asarray(grads[2])[:, 72:] == 0)


def test_reused_selection_and_stats():
    q, k, v = qkv(17, batch=1, lq=96, d=64)
    cfg = baatt.BAConfig(block_size=32, sparsity=0.5)
    sel = select_blocks(q, k, cfg, is_causal=True)
    out, stats = baatt.attention(q, k, v, config=cfg, is_causal=True, return_stats=True)
    assert stats["selection"].mask == CAUSAL
    np.testing.assert_allclose(baatt.attention(q, k, v, is_causal=True, selection=sel), out, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_naming_the_rule():
    q, k, v = qkv(18, batch=1, lq=64, d=16)
    with pytest.raises(ValueError, match=r"BAConfig\.sort_q must be False under a causal mask"):
        baatt.BAConfig(sort_q=True, mask="causal")
    with pytest.raises(ValueError, match=r"BAConfig\.sort_k must be False under a block_causal mask"):
        baatt.BAConfig(sort_k=True, mask=AttentionMask.block_causal(256))
    with pytest.raises(ValueError, match=r"BAConfig\.sort_q must be False under a causal mask"):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16, sort_q=True), is_causal=True)
    with pytest.raises(ValueError, match=r"generation_block \(48\) must be a multiple of the query and key block"):
        baatt.BAConfig(block_size=32, mask=AttentionMask.block_causal(48))
    with pytest.raises(ValueError, match=r"AttentionMask\.generation_block must be a positive int"):
        AttentionMask("block_causal")
    with pytest.raises(ValueError, match=r"AttentionMask\.kind must be one of"):
        AttentionMask("sliding")
    with pytest.raises(ValueError, match=r"is_causal=True asks for a token-causal mask but config\.mask is block"):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16, mask=AttentionMask.block_causal(32)),
                        is_causal=True)
    bidirectional = select_blocks(q, k, baatt.BAConfig(block_size=16))
    with pytest.raises(ValueError, match=r"selection was made under a bidirectional mask but attention runs under "
                                         r"causal"):
        baatt.attention(q, k, v, is_causal=True, selection=bidirectional)
    causal = select_blocks(q, k, baatt.BAConfig(block_size=16), is_causal=True)
    with pytest.raises(ValueError, match=r"selection was made under a causal mask but attention runs under "
                                         r"bidirectional"):
        baatt.attention(q, k, v, selection=causal)
    with pytest.raises(ValueError, match=r"a causal mask is positional: q_perm and k_perm must be None"):
        layout.to_block_space(q, k, v, block_q=16, block_k=16, mask=CAUSAL, q_perm=jnp.zeros((1, 4, 64), jnp.int32))


def test_mosaic_gpu_takes_causal_masks():
    q, k, v = qkv(19, batch=1, lq=256, d=128, dtype=jnp.bfloat16)
    reason = mosaic_gpu.why_unavailable(q, k, v, baatt.BAConfig(block_size=128, mask="causal"), False)
    assert reason == baatt.platform.hopper_reason()


# ----------------------------------------------------------------------------- benchmark script


def test_bench_causal_cpu_smoke(tmp_path):
    from experiments import bench_causal

    result = bench_causal.main(["--preset", "smoke", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["L"] == 256 and 0 < row["full_density"] < 1
    for key in ("kernel_fwd_ms", "kernel_fwdbwd_ms", "full_fwd_ms", "full_fwdbwd_ms", "cudnn_fwd_ms"):
        assert row[key] > 0, key
    assert row["kernel_fwd_tflops"] * row["kernel_fwd_ms"] == pytest.approx(
        bench_causal.causal_forward_flops(bench_causal.get_config("smoke"), 256) / 1e9)
    md = (tmp_path / "bench_causal.md").read_text()
    assert "Kernel throughput at 0% sparsity" in md and "End to end at 90% sparsity" in md


@pytest.mark.parametrize("mask", [AttentionMask.causal(), AttentionMask.block_causal(256)], ids=["causal", "block256"])
def test_masked_selections_take_the_positional_path_when_blocks_are_whole(mask):
    # The Mosaic kernel applies the mask on positions, so a masked selection needs no block-space copies.
    from baatt.api import takes_positional_path
    impl = types.SimpleNamespace(positional_op=lambda *a, **kw: None)
    x = jnp.zeros((1, 512, 2, 64), jnp.float32)
    sel = select_blocks(x, x, baatt.BAConfig(block_size=128, sparsity=0.5, mask=mask))
    assert takes_positional_path(impl, x, x, None, sel, interpret=False)
    assert not takes_positional_path(impl, x, x, jnp.ones((1, 512), bool), sel, interpret=False)
    assert not takes_positional_path(impl, x[:, :500], x[:, :500], None,
                                     select_blocks(x[:, :500], x[:, :500], baatt.BAConfig(block_size=128, mask=mask)),
                                     interpret=False)
