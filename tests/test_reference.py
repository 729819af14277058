"""The references against independent float64 NumPy, on fresh random inputs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import baatt
from baatt import reference
from baatt.selection import estimator, sorting
from tests import bruteforce as bf

SETTINGS = settings(max_examples=8, deadline=None)


@st.composite
def problems(draw, *, max_len=160):
    """Random shapes: ragged lengths, GQA, batch > 1, optional key padding."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([8, 16]))
    block = draw(st.sampled_from([8, 16, 32]))
    # A few lengths (ragged and whole-block) so compiled programs are reused across tests.
    lq = draw(st.sampled_from([1, 37, 64, 100, max_len]))
    lk = draw(st.sampled_from([5, 48, 64, 129, max_len]))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Heavy-ish tails and a shared offset so blocks are not all alike.
    q = rng.standard_normal((batch, lq, kv_heads * group, head_dim)) * rng.gamma(2.0, 0.5, (batch, lq, kv_heads * group, 1))
    k = rng.standard_normal((batch, lk, kv_heads, head_dim)) * rng.gamma(2.0, 0.5, (batch, lk, kv_heads, 1)) + 0.3
    v = rng.standard_normal((batch, lk, kv_heads, head_dim))
    mask = None
    if padded:
        lengths = rng.integers(1, lk + 1, size=batch)
        mask = np.arange(lk)[None, :] < lengths[:, None]
        # Also knock out a few interior keys: a key mask need not be a prefix.
        mask &= rng.random((batch, lk)) > 0.15
        mask[np.arange(batch), 0] = True
    return dict(q=q.astype(np.float32), k=k.astype(np.float32), v=v.astype(np.float32), mask=mask, block=block)


def jx(p):
    m = None if p["mask"] is None else jnp.asarray(p["mask"])
    return jnp.asarray(p["q"]), jnp.asarray(p["k"]), jnp.asarray(p["v"]), m


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@SETTINGS
@given(problems())
def test_dense_attention_matches_numpy(p):
    q, k, v, m = jx(p)
    out, lse = reference.dense_attention(q, k, v, key_mask=m)
    ref_out, ref_lse = bf.dense(p["q"], p["k"], p["v"], p["mask"])
    assert rel(out, ref_out) < 1e-5
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems())
def test_norm_sort_matches_numpy(p):
    q, k, v, m = jx(p)
    perm, inv = reference.norm_sort(k, mask=m)
    ref = bf.norm_perm(p["k"], p["mask"])
    np.testing.assert_array_equal(perm, ref)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(perm), np.asarray(inv), -1),
                                  np.broadcast_to(np.arange(k.shape[1]), perm.shape))


def test_norm_sort_ties_and_integer_comparator():
    """Ties (zero and repeated rows) and masked tokens keep positional order, as a stable float argsort
    would; and the sort XLA sees compares int32 keys only (the form its GPU radix sort takes)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 300, 3, 8)).astype(np.float32)
    x[:, 10:40] = 0.0
    x[:, 50:60] = x[:, 49:50]
    mask = rng.uniform(size=(2, 300)) < 0.8
    perm, _ = sorting.norm_sort(jnp.asarray(x), mask=jnp.asarray(mask))
    norms = np.where(mask[:, :, None], np.linalg.norm(x, axis=-1), np.inf).transpose(0, 2, 1)
    np.testing.assert_array_equal(perm, np.argsort(norms, axis=-1, kind="stable"))
    hlo = jax.jit(lambda a: sorting.norm_sort(a)[0]).lower(jnp.asarray(x)).as_text()
    comparator = hlo[hlo.index("stablehlo.sort"):]
    comparator = comparator[: comparator.index("stablehlo.return")]
    assert "SIGNED" in comparator and "FLOAT" not in comparator and "TOTALORDER" not in comparator
    # The flat route (two 1-D sorts) gives the same permutation, ties and padding included, and its
    # sorts are 1-D with an int32 comparator too.
    flat, _ = sorting.norm_sort(jnp.asarray(x), mask=jnp.asarray(mask), method="flat")
    np.testing.assert_array_equal(flat, perm)
    compiled = jax.jit(lambda a: sorting.norm_sort(a, method="flat")[0]).lower(jnp.asarray(x)).compile().as_text()
    sorts = re.findall(r"= \(([^)]*)\) sort\(", compiled)
    assert len(sorts) == 2 and all(s.count("s32[1800]") == 2 for s in sorts), sorts  # two 1-D (key, index) sorts
    with pytest.raises(ValueError, match="method must be one of"):
        sorting.norm_sort(jnp.asarray(x), method="radix")


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 70), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_argsort_rows_flat_equals_segmented(b, h, length, key_range, seed):
    """Random int32 keys with many ties (few distinct values), including the largest ones."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, key_range, (b, h, length)).astype(np.int32) * (2**31 - 1 - key_range) // key_range
    want = np.argsort(keys, axis=-1, kind="stable")
    for method in ("segmented", "flat"):
        got = np.asarray(sorting.argsort_rows(jnp.asarray(keys), method))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(problems(), st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
       st.sampled_from([None, 0.5, 1.0]))
def test_pre_downsample_scores_match_numpy(p, sorts, beta):
    q, k, v, m = jx(p)
    cfg = baatt.BAConfig(block_size=p["block"], sort_q=sorts[0], sort_k=sorts[1],
                         compensate=beta is not None, beta=1.0 if beta is None else beta)
    got = reference.pre_downsample_scores(q, k, cfg, key_mask=m)
    q_perm = bf.norm_perm(p["q"]) if sorts[0] else None
    k_perm = bf.norm_perm(p["k"], p["mask"]) if sorts[1] else None
    want = bf.pre_scores(p["q"], p["k"], p["block"], p["block"], mask=p["mask"],
                         q_perm=q_perm, k_perm=k_perm, beta=beta)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(got)[fin], want[fin], rtol=1e-4, atol=1e-4)


@SETTINGS
@given(problems())
def test_fast_norm_sort_equals_reference(p):
    """The estimator's sort (int32 keys, either row route) gives the reference's permutations exactly."""
    q, k, v, m = jx(p)
    want_perm, want_inverse = reference.norm_sort(k, mask=m)
    for method in sorting.ROW_ARGSORT_METHODS:
        perm, inverse = sorting.norm_sort(k, mask=m, method=method)
        np.testing.assert_array_equal(perm, want_perm)
        np.testing.assert_array_equal(inverse, want_inverse)


@SETTINGS
@given(problems(), st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
       st.sampled_from([None, 0.5]), st.booleans())
def test_estimator_matches_reference_scores(p, sorts, beta, count_correction):
    """The fast estimator (one-read statistics, fast sorts) = the reference's plain pre-downsample scores."""
    q, k, v, m = jx(p)
    cfg = baatt.BAConfig(block_size=p["block"], sort_q=sorts[0], sort_k=sorts[1], compensate=beta is not None,
                         beta=1.0 if beta is None else beta, count_correction=count_correction)
    est = estimator.estimate(q, k, cfg, key_mask=m)
    want = np.asarray(reference.pre_downsample_scores(q, k, cfg, key_mask=m))
    np.testing.assert_array_equal(np.isfinite(est.scores), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(est.scores)[fin], want[fin], rtol=1e-5, atol=1e-5)
    if sorts[1]:
        np.testing.assert_array_equal(est.k_perm, reference.norm_sort(k, mask=m)[0])


@SETTINGS
@given(problems(), st.booleans())
def test_post_downsample_map_matches_numpy(p, sort):
    q, k, v, m = jx(p)
    q_perm = k_perm = None
    if sort:
        q_perm, _ = reference.norm_sort(q)
        k_perm, _ = reference.norm_sort(k, mask=m)
    got = reference.post_downsample_map(q, k, block_size=p["block"], key_mask=m, q_perm=q_perm, k_perm=k_perm)
    want = bf.post_map(p["q"], p["k"], p["block"], p["block"], mask=p["mask"],
                       q_perm=None if q_perm is None else np.asarray(q_perm),
                       k_perm=None if k_perm is None else np.asarray(k_perm))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)


@SETTINGS
@given(problems(), st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.booleans())
def test_block_sparse_attention_matches_numpy(p, sparsity, sort):
    q, k, v, m = jx(p)
    cfg = baatt.BAConfig(block_size=p["block"], sparsity=sparsity, sort_q=sort, sort_k=sort, compensate=sort)
    sel = baatt.select_blocks(q, k, cfg, key_mask=m)
    out, lse = reference.block_sparse_attention(q, k, v, sel, key_mask=m)
    want_out, want_lse = bf.block_sparse(
        p["q"], p["k"], p["v"], np.asarray(sel.indices), np.asarray(sel.counts), p["block"], p["block"],
        mask=p["mask"], q_perm=None if sel.q_perm is None else np.asarray(sel.q_perm),
        k_perm=None if sel.k_perm is None else np.asarray(sel.k_perm),
    )
    assert rel(out, want_out) < 1e-5
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems(), st.sampled_from([0.2, 0.5, 0.75]))
def test_sparsity_selection_keeps_top_scores(p, sparsity):
    q, k, v, m = jx(p)
    cfg = baatt.BAConfig(block_size=p["block"], sparsity=sparsity, compensate=True, beta=0.5)
    sel = baatt.select_blocks(q, k, cfg, key_mask=m)
    scores = bf.pre_scores(p["q"], p["k"], p["block"], p["block"], mask=p["mask"], beta=0.5)
    nk = scores.shape[-1]
    kappa = int(np.ceil(round((1 - sparsity) * nk, 9)))
    np.testing.assert_array_equal(sel.kept_mask(nk), bf.topk_rows(scores, kappa))
    idx = np.asarray(sel.indices)
    cnt = np.asarray(sel.counts)
    for row in np.ndindex(cnt.shape):
        kept = idx[row][: cnt[row]]
        assert np.all(np.diff(kept) > 0), "kept ids must be ascending and distinct"
        assert np.all(idx[row][cnt[row]:] == kept[-1]), "tail must repeat the last kept id"


@SETTINGS
@given(problems(), st.sampled_from([0.5, 0.8, 0.95, 1.0]), st.sampled_from([1, 2]))
def test_tau_selection_is_minimal_prefix(p, tau, min_blocks):
    q, k, v, m = jx(p)
    cfg = baatt.BAConfig(block_size=p["block"], tau=tau, min_blocks=min_blocks)
    sel = baatt.select_blocks(q, k, cfg, key_mask=m)
    scores = bf.pre_scores(p["q"], p["k"], p["block"], p["block"], mask=p["mask"])
    np.testing.assert_array_equal(sel.kept_mask(scores.shape[-1]), bf.tau_rows(scores, tau, min_blocks))


@SETTINGS
@given(problems())
def test_error_metrics_match_numpy(p):
    q, k, v, m = jx(p)
    b = p["block"]
    u = reference.error.bound(q, k, block_size=b, key_mask=m)
    dev = reference.error.logit_deviation(q, k, block_size=b, key_mask=m)
    want_u, want_dev = bf.bound_and_deviation(p["q"], p["k"], b, b, mask=p["mask"])
    np.testing.assert_allclose(u, want_u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dev, want_dev, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(dev) <= np.asarray(u) * (1 + 1e-4) + 1e-5), "the bound must hold"


def test_distribution_metrics_against_numpy():
    rng = np.random.default_rng(7)
    m_hat = rng.dirichlet(np.ones(9) * 0.5, size=(2, 3, 5))
    m = rng.dirichlet(np.ones(9), size=(2, 3, 5))
    tv = reference.error.total_variation(jnp.asarray(m_hat), jnp.asarray(m))
    kl = reference.error.kl_divergence(jnp.asarray(m_hat), jnp.asarray(m))
    np.testing.assert_allclose(tv, 0.5 * np.abs(m_hat - m).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(kl, (m_hat * np.log(m_hat / m)).sum(-1), rtol=1e-4, atol=1e-6)
    x, y = rng.standard_normal(50), rng.standard_normal(50)
    y = y + x
    np.testing.assert_allclose(reference.error.pearson(jnp.asarray(x), jnp.asarray(y)), np.corrcoef(x, y)[0, 1], rtol=1e-4)


def test_oracle_recall_against_numpy():
    rng = np.random.default_rng(3)
    m_hat = rng.dirichlet(np.ones(8) * 0.3, size=(1, 2, 4)).astype(np.float32)
    counts = rng.integers(1, 5, size=(1, 2, 4))
    idx = np.zeros((1, 2, 4, 4), np.int32)
    for row in np.ndindex(counts.shape):
        ids = np.sort(rng.choice(8, counts[row], replace=False))
        idx[row] = np.concatenate([ids, np.full(4 - counts[row], ids[-1])])
    sel = baatt.BlockSelection(jnp.asarray(idx), jnp.asarray(counts, jnp.int32), block_q=16, block_k=16)
    got = reference.error.oracle_recall(jnp.asarray(m_hat), sel)
    for row in np.ndindex(counts.shape):
        kept = m_hat[row][idx[row][: counts[row]]].sum()
        best = np.sort(m_hat[row])[::-1][: counts[row]].sum()
        np.testing.assert_allclose(got[row], kept / best, rtol=1e-5)
    assert np.all(np.asarray(got) <= 1 + 1e-6)


def test_references_jit():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 100, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 100, 1, 16)), jnp.float32)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, sort_k=True, compensate=True)
    eager = reference.pre_downsample_scores(q, k, cfg)
    jitted = jax.jit(reference.pre_downsample_scores, static_argnums=2)(q, k, cfg)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    m1 = jax.jit(lambda q, k: reference.post_downsample_map(q, k, block_size=16))(q, k)
    np.testing.assert_allclose(m1, reference.post_downsample_map(q, k, block_size=16), rtol=1e-6)


@pytest.mark.slow
def test_post_downsample_map_runs_at_16k_on_cpu():
    """L = 16384, H = 4, D = 64: the streaming oracle must not materialise L x L (4 GiB per head pair)."""
    import resource

    key = jax.random.key(1)
    q = jax.random.normal(key, (1, 16384, 4, 64), jnp.float32)
    k = jax.random.normal(jax.random.fold_in(key, 1), (1, 16384, 4, 64), jnp.float32)
    m = jax.jit(lambda q, k: reference.post_downsample_map(q, k, block_size=128))(q, k)
    m = np.asarray(m)
    assert m.shape == (1, 4, 128, 128)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-4)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 12, f"peak RSS {peak_gib:.1f} GiB: the oracle map is not streaming"


@SETTINGS
@given(problems())
def test_block_stats_positional_equals_head_major_stats(p):
    """The estimator's unsorted path (stats read in [B, L, H, D]) = block_stats on to_block_space's copy."""
    from baatt import layout
    from baatt.selection.estimator import block_stats, block_stats_positional

    q, k, v, m = jx(p)
    b = p["block"]
    space = layout.to_block_space(q, k, None, block_q=b, block_k=b, key_mask=m)
    for got, want in ((block_stats_positional(q, None, b), block_stats(space.q, space.q_valid[:, None, :], b)),
                      (block_stats_positional(k, m, b), block_stats(space.k, space.kv_valid, b))):
        assert got.mean.shape == want.mean.shape and got.count.shape == want.count.shape
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.var, want.var, rtol=1e-5, atol=1e-6)


def test_block_stats_one_pass_moments_against_float64():
    """The one-read moments (shifted sums) match float64 two-pass moments where a plain
    E[x^2] - E[x]^2 in float32 cancels (|mean| = 1e3 x spread), on masked groups whose first element
    is valid or not, and with_var=False gives the same means without a variance."""
    from baatt.selection.estimator import block_stats, block_stats_positional

    rng = np.random.default_rng(0)
    b, h, n, blk, d = 2, 3, 4, 32, 16
    x = 300.0 + 0.3 * rng.standard_normal((b, h, n * blk, d))
    valid = rng.uniform(size=(b, 1, n * blk)) < 0.7
    valid[:, :, ::blk] = np.array([True, False, True, False])  # groups with and without a valid first element
    valid[0, :, 2 * blk : 3 * blk] = False  # one empty block
    got = block_stats(jnp.asarray(x, jnp.float32), jnp.asarray(valid), blk)
    xb = x.reshape(b, h, n, blk, d)
    vb = np.broadcast_to(valid.reshape(b, 1, n, blk, 1), xb.shape)
    cnt = vb.sum(3)
    mean = np.where(cnt > 0, (xb * vb).sum(3) / np.maximum(cnt, 1), 0.0)
    var = np.where(cnt > 0, (((xb - mean[..., None, :]) ** 2) * vb).sum(3) / np.maximum(cnt, 1), 0.0)
    np.testing.assert_array_equal(got.count, cnt[..., 0])
    np.testing.assert_allclose(got.mean, mean, rtol=1e-6, atol=1e-4)
    lead_valid = valid[:, 0, ::blk]  # [b, n]: groups with a valid first element use it as the shift
    shifted = np.broadcast_to(lead_valid[:, None, :, None], var.shape)
    np.testing.assert_allclose(np.where(shifted, got.var, var), var, rtol=2e-3, atol=1e-6)
    assert np.all(np.asarray(got.var)[0, :, 2] == 0) and np.all(np.asarray(got.mean)[0, :, 2] == 0)
    # Without a valid first element the shift is 0: still finite and non-negative.
    assert np.all(np.isfinite(got.var)) and np.all(np.asarray(got.var) >= 0)

    xp = jnp.asarray(np.transpose(x, (0, 2, 1, 3)), jnp.float32)  # [B, L, H, D], every key valid
    full = block_stats_positional(xp, None, blk)
    np.testing.assert_allclose(full.var, xb.var(3), rtol=2e-3, atol=1e-6)
    lean = block_stats_positional(xp, None, blk, with_var=False)
    assert lean.var is None
    np.testing.assert_allclose(lean.mean, full.mean, rtol=1e-6)
    np.testing.assert_array_equal(lean.count, full.count)


def test_block_space_permutations_round_trip_with_gradients():
    """to_block_space gathers rows by the permutations, from_block_space puts them back (values and
    gradients), against NumPy indexing: batch > 1, GQA, a length that pads the last block."""
    from baatt import layout

    rng = np.random.default_rng(11)
    b, lq, lk, hq, hkv, d, blk = 2, 37, 45, 4, 2, 8, 16
    q = jnp.asarray(rng.standard_normal((b, lq, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), jnp.float32)
    qp = jnp.asarray(np.stack([[rng.permutation(lq) for _ in range(hq)] for _ in range(b)]), jnp.int32)
    kp = jnp.asarray(np.stack([[rng.permutation(lk) for _ in range(hkv)] for _ in range(b)]), jnp.int32)
    sp = layout.to_block_space(q, k, k, block_q=blk, block_k=blk, q_perm=qp, k_perm=kp)
    qn, kn, qpn, kpn = map(np.asarray, (q, k, qp, kp))
    for bi in range(b):
        for h in range(hq):
            np.testing.assert_array_equal(np.asarray(sp.q)[bi, h, :lq], qn[bi, qpn[bi, h], h])
        for h in range(hkv):
            np.testing.assert_array_equal(np.asarray(sp.k)[bi, h, :lk], kn[bi, kpn[bi, h], h])
    lse = jnp.asarray(rng.standard_normal(sp.q.shape[:3]), jnp.float32)
    back, lse_back = layout.from_block_space(sp.q, lse, length_q=lq, q_perm=qp)
    np.testing.assert_array_equal(np.asarray(back), qn)
    for bi in range(b):
        for h in range(hq):
            np.testing.assert_array_equal(np.asarray(lse_back)[bi, h, qpn[bi, h]], np.asarray(lse)[bi, h, :lq])
    np.testing.assert_array_equal(np.asarray(layout.invert_permutation(qp))[0, 0][qpn[0, 0]], np.arange(lq))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def round_trip(x):
        s = layout.to_block_space(x, k, None, block_q=blk, block_k=blk, q_perm=qp, k_perm=kp)
        return jnp.sum(layout.from_block_space(s.q, s.q[..., 0], length_q=lq, q_perm=qp)[0] * w)

    np.testing.assert_allclose(np.asarray(jax.grad(round_trip)(q)), np.asarray(w), rtol=0, atol=0)
