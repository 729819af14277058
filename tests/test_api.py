"""baatt.attention: equivalence with dense attention, poisoning, gradients, and every error message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import baatt
from baatt import reference
from tests import bruteforce as bf


def make(rng, batch=2, lq=150, lk=150, hq=4, hkv=2, d=16, dtype=np.float32):
    q = rng.standard_normal((batch, lq, hq, d)) * rng.gamma(2.0, 0.5, (batch, lq, hq, 1))
    k = rng.standard_normal((batch, lk, hkv, d)) * rng.gamma(2.0, 0.5, (batch, lk, hkv, 1))
    v = rng.standard_normal((batch, lk, hkv, d))
    return (jnp.asarray(x, dtype) for x in (q, k, v))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sorts=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    shape=st.sampled_from([(1, 64, 64, 2, 2), (2, 100, 100, 4, 2), (1, 37, 150, 2, 1), (2, 150, 129, 4, 1)]),
    padded=st.booleans(),
    block=st.sampled_from([16, 32]),
)
def test_all_blocks_kept_equals_dense(seed, sorts, shape, padded, block):
    rng = np.random.default_rng(seed)
    b, lq, lk, hq, hkv = shape
    q, k, v = make(rng, b, lq, lk, hq, hkv)
    mask = None
    if padded:
        mask = jnp.asarray(np.arange(lk)[None] < rng.integers(1, lk + 1, (b, 1)))
    cfg = baatt.BAConfig(block_size=block, sort_q=sorts[0], sort_k=sorts[1], compensate=True)
    out, stats = baatt.attention(q, k, v, config=cfg, key_mask=mask, return_stats=True)
    ref_out, ref_lse = reference.dense_attention(q, k, v, key_mask=mask)
    assert rel(out, ref_out) < 1e-5
    np.testing.assert_allclose(stats["lse"], ref_lse, rtol=1e-5, atol=1e-5)
    assert stats["implementation"] == "reference"
    # Density counts every block that holds a real key.
    want_nonempty = np.ones((b,)) if mask is None else np.asarray(
        [len({i // block for i in range(lk) if mask[bi, i]}) for bi in range(b)]) / -(-lk // block)
    np.testing.assert_allclose(stats["density"], np.broadcast_to(want_nonempty[:, None], (b, hq)), rtol=1e-6)


def _hand_selection(b, hq, nq, kept_blocks, block):
    ids = np.asarray(sorted(kept_blocks), np.int32)
    indices = np.broadcast_to(ids, (b, hq, nq, ids.size)).copy()
    counts = np.full((b, hq, nq), ids.size, np.int32)
    return baatt.BlockSelection(jnp.asarray(indices), jnp.asarray(counts), block_q=block, block_k=block)


@pytest.mark.parametrize("poison", [np.nan, np.finfo(np.float32).max, np.inf])
def test_unselected_blocks_and_padding_are_never_read(poison):
    rng = np.random.default_rng(11)
    q, k, v = make(rng, 2, 96, 112, 4, 2)
    block = 16  # 7 key blocks, the last one ragged is not: 112 = 7 * 16
    lengths = np.asarray([100, 112])
    mask = jnp.asarray(np.arange(112)[None] < lengths[:, None])
    sel = _hand_selection(2, 4, 6, {0, 2, 5, 6}, block)
    clean_out, clean_lse = reference.block_sparse_attention(q, k, v, sel, key_mask=mask)
    kp, vp = np.array(k), np.array(v)
    for j in (1, 3, 4):  # never selected
        kp[:, j * block:(j + 1) * block] = poison
        vp[:, j * block:(j + 1) * block] = poison
    kp[0, 100:] = poison  # padding of batch row 0
    vp[0, 100:] = poison
    out, lse = reference.block_sparse_attention(q, jnp.asarray(kp), jnp.asarray(vp), sel, key_mask=mask)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    np.testing.assert_array_equal(out, clean_out)
    np.testing.assert_array_equal(lse, clean_lse)

    def loss(q, k, v):
        return jnp.sum(reference.block_sparse_attention(q, k, v, sel, key_mask=mask)[0] ** 2)

    g_clean = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    g_poison = jax.grad(loss, argnums=(0, 1, 2))(q, jnp.asarray(kp), jnp.asarray(vp))
    np.testing.assert_array_equal(g_poison[0], g_clean[0])
    for gp, gc in zip(g_poison[1:], g_clean[1:]):
        assert np.all(np.isfinite(gp))
        np.testing.assert_array_equal(np.asarray(gp)[:, :100], np.asarray(gc)[:, :100])


def test_padding_poison_through_public_api():
    rng = np.random.default_rng(5)
    q, k, v = make(rng, 2, 80, 80, 2, 2)
    mask = jnp.asarray(np.arange(80)[None] < np.asarray([[50], [80]]))
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, sort_k=True, compensate=True)
    clean = baatt.attention(q, k, v, config=cfg, key_mask=mask)
    kp = k.at[0, 50:].set(jnp.nan)
    vp = v.at[0, 50:].set(jnp.finfo(jnp.float32).max)
    poisoned = baatt.attention(q, kp, vp, config=cfg, key_mask=mask)
    assert np.all(np.isfinite(poisoned))
    np.testing.assert_array_equal(poisoned, clean)


@pytest.mark.parametrize("sort", [False, True])
def test_gradients_match_masked_dense(sort):
    """Gradients of the block-sparse reference equal those of dense attention under the block mask."""
    rng = np.random.default_rng(2 + sort)
    q, k, v = make(rng, 1, 70, 90, 4, 2)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, sort_q=sort, sort_k=sort)
    sel = baatt.select_blocks(q, k, cfg)
    kept = np.asarray(sel.kept_mask(6))  # [B, Hq, Nq, Nk] in (sorted) block space
    q_slot = np.arange(70) if sel.q_perm is None else np.argsort(np.asarray(sel.q_perm), -1)
    k_slot = np.arange(90) if sel.k_perm is None else np.argsort(np.asarray(sel.k_perm), -1)
    tok = np.zeros((1, 4, 70, 90), bool)
    for h in range(4):
        qs = q_slot if sel.q_perm is None else q_slot[0, h]
        ks = k_slot if sel.k_perm is None else k_slot[0, h // 2]
        tok[0, h] = kept[0, h][np.ix_(qs // 16, ks // 16)]

    def masked_dense(q, k, v):
        kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("blhd,bmhd->bhlm", q, kk, precision="highest") / 4.0
        p = jax.nn.softmax(jnp.where(tok, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhlm,bmhd->blhd", p, vv, precision="highest")

    w = jnp.asarray(rng.standard_normal((1, 70, 4, 16)), jnp.float32)
    g_ref = jax.grad(lambda *a: jnp.sum(masked_dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_sp = jax.grad(lambda *a: jnp.sum(reference.block_sparse_attention(*a, sel)[0] * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_sp, g_ref):
        assert rel(a, b) < 1e-5


def test_attention_under_jit_and_grad():
    rng = np.random.default_rng(9)
    q, k, v = make(rng, 1, 64, 64, 2, 1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, sort_k=True)
    f = jax.jit(lambda q, k, v: jnp.sum(baatt.attention(q, k, v, config=cfg) ** 2))
    g = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(x)) for x in g)
    np.testing.assert_allclose(f(q, k, v), jnp.sum(baatt.attention(q, k, v, config=cfg) ** 2), rtol=1e-5)


def test_sparse_output_matches_numpy_for_each_reference_selector():
    rng = np.random.default_rng(4)
    q, k, v = make(rng, 1, 64, 80, 2, 1)
    for selector in ("baatt", "meanpool", "oracle", "random", "dense"):
        cfg = baatt.BAConfig(block_size=16, sparsity=0.6, selector=selector)
        out, stats = baatt.attention(q, k, v, config=cfg, return_stats=True)
        sel = stats["selection"]
        want, _ = bf.block_sparse(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(sel.indices),
                                  np.asarray(sel.counts), 16, 16)
        assert rel(out, want) < 1e-5, selector


def test_oracle_selector_keeps_the_largest_oracle_blocks():
    rng = np.random.default_rng(8)
    q, k, v = make(rng, 1, 64, 96, 2, 2)
    sel = baatt.select_blocks(q, k, baatt.BAConfig(block_size=16, sparsity=0.5), selector="oracle")
    m_hat = bf.post_map(np.asarray(q), np.asarray(k), 16, 16)
    np.testing.assert_array_equal(sel.kept_mask(6), bf.topk_rows(m_hat, 3))


def test_forced_sink_and_local_blocks():
    rng = np.random.default_rng(1)
    q, k, _ = make(rng, 1, 128, 128, 2, 1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.75, force_sink=True, local_window=1)
    kept = np.asarray(baatt.select_blocks(q, k, cfg).kept_mask(8))
    assert kept[..., 0].all(), "the sink block must always be kept"
    for a in range(8):
        for j in range(max(0, a - 1), min(8, a + 2)):
            assert kept[:, :, a, j].all(), (a, j)
    # With K sorted, the sink is whichever sorted block holds position 0.
    cfg = baatt.BAConfig(block_size=16, sparsity=0.875, force_sink=True, sort_k=True)
    sel = baatt.select_blocks(q, k, cfg)
    slot = int(np.argsort(np.asarray(sel.k_perm[0, 0]))[0])
    assert np.asarray(sel.kept_mask(8))[0, :, :, slot // 16].all()


# ---- bad input: a clear error naming the argument and the rule --------------------------------

def _qkv():
    return make(np.random.default_rng(0), 1, 32, 32, 2, 1)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v: (q[0], k, v), "q must have rank 4"),
        (lambda q, k, v: (q, k[..., :8], v), "head_dim of q and k must match"),
        (lambda q, k, v: (q[:, :, :1], jnp.concatenate([k, k], 2), jnp.concatenate([v, v], 2)), "kv heads must divide query heads"),
        (lambda q, k, v: (q.astype(jnp.int32), k, v), "q must be float32, bfloat16, float16 or float64"),
        (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), "q and k must share a dtype"),
        (lambda q, k, v: (q, k, v[:, :5]), "v must have shape"),
        (lambda q, k, v: (q.at[0, 0, 0, 0].set(jnp.nan), k, v), "q contains NaN or Inf"),
        (lambda q, k, v: (q, k, v.at[0, 3, 0, 0].set(jnp.inf)), "v contains NaN or Inf"),
        (lambda q, k, v: (jnp.concatenate([q, q]), k, v), "must share the batch size"),
    ],
)
def test_bad_tensors_raise(mutate, message):
    q, k, v = mutate(*_qkv())
    with pytest.raises(ValueError, match=message):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=12), "block_size must be a power of two"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(block_size_k=3), "block_size_k must be a positive int|block_size_k must be a power of two"),
        (dict(sparsity=1.0), r"sparsity must be a finite number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a finite number in \[0, 1\)"),
        (dict(sparsity=float("nan")), "sparsity must be a finite number"),
        (dict(tau=0.0), r"tau must be a finite number in \(0, 1\]"),
        (dict(tau=0.9, sparsity=0.5), "sparsity and tau are exclusive"),
        (dict(min_blocks=0), "min_blocks must be an int >= 1"),
        (dict(tau=0.9, min_blocks=3, max_blocks=2), "max_blocks must be an int >= min_blocks"),
        (dict(beta=float("inf")), "beta must be a finite number"),
        (dict(selector="magic"), "selector must be one of"),
        (dict(local_window=1, sort_k=True), "local_window is positional"),
        (dict(xattn_stride=5), "xattn_stride must divide block_size"),
        (dict(sort_q=1), "sort_q must be a bool"),
        (dict(min_blocks=True), "min_blocks must be an int >= 1"),
        (dict(seed=1.5), "seed must be an int"),
        (dict(last_query_gamma="high"), "last_query_gamma must be a number"),
        (dict(selector=["baatt"]), "selector must be one of"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=r"BAConfig\." + message):
        baatt.BAConfig(**kwargs)


def test_bad_key_mask_and_implementation_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_mask must have shape"):
        baatt.attention(q, k, v, key_mask=jnp.ones((1, 5), bool))
    with pytest.raises(ValueError, match="key_mask must be a bool array"):
        baatt.attention(q, k, v, key_mask=jnp.ones((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="key_mask must be a bool array"):
        baatt.attention(q, k, v, key_mask=[[1] * 32])
    for scale in (float("nan"), float("inf"), 0.0, -1.0, "big", jnp.ones(2)):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            baatt.attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="implementation must be one of"):
        baatt.attention(q, k, v, implementation="magic")
    with pytest.raises(ValueError, match="config must be a baatt.BAConfig"):
        baatt.attention(q, k, v, config={"sparsity": 0.5})


def test_unavailable_implementations_raise_with_every_reason(monkeypatch):
    q, k, v = _qkv()
    reasons = {"tpu_only": "needs a TPU; head dim 16 is not supported", "sm100_only": "needs an sm100 GPU"}
    for name, why in reasons.items():
        impl = baatt.Implementation(name=name, priority=-1, why_unavailable=lambda *args, why=why: why,
                                    sparse_op=baatt.api.REFERENCE_IMPLEMENTATION.sparse_op)
        monkeypatch.setitem(baatt.api._REGISTRY, name, impl)
    with pytest.raises(baatt.ImplementationUnavailable, match=r"requested implementation\(s\) cannot run: "
                       r"tpu_only: needs a TPU; head dim 16 is not supported; sm100_only: needs an sm100 GPU") as err:
        baatt.attention(q, k, v, implementation=("tpu_only", "sm100_only"))
    assert isinstance(err.value, NotImplementedError) and err.value.reasons == reasons
    # The first of the sequence that can run is taken.
    _, stats = baatt.attention(q, k, v, implementation=("tpu_only", "reference"), return_stats=True)
    assert stats["implementation"] == "reference"
    with pytest.raises(ValueError, match="impl must be a baatt.Implementation"):
        baatt.register_implementation("reference")


def test_one_public_dense_attention():
    assert baatt.dense_attention is reference.dense_attention


def test_empty_or_out_of_range_selection_raises():
    q, k, v = _qkv()
    sel = _hand_selection(1, 2, 2, {0}, 16)
    empty = baatt.BlockSelection(sel.indices, jnp.zeros_like(sel.counts), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="selection.counts must be >= 1"):
        reference.block_sparse_attention(q, k, v, empty)
    bad = baatt.BlockSelection(sel.indices + 5, sel.counts, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"selection.indices must lie in \[0, 2\)"):
        reference.block_sparse_attention(q, k, v, bad)
    with pytest.raises(ValueError, match="selection.indices must have shape"):
        reference.block_sparse_attention(jnp.concatenate([q, q], 1), k, v, sel)


def test_reused_selection_gives_the_same_output_as_fresh():
    rng = np.random.default_rng(12)
    q, k, v = make(rng, 1, 96, 96, 2, 1)
    cfg = baatt.BAConfig(block_size=32, sparsity=0.5, sort_k=True)
    out, stats = baatt.attention(q, k, v, config=cfg, return_stats=True)
    again = baatt.attention(q, k, v, selection=stats["selection"])
    np.testing.assert_array_equal(again, out)
    # A different q with the old selection: the same as the reference over that selection.
    q2 = q + 0.1
    want, _ = reference.block_sparse_attention(q2, k, v, stats["selection"])
    np.testing.assert_allclose(baatt.attention(q2, k, v, selection=stats["selection"]), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="selection must be a baatt.BlockSelection"):
        baatt.attention(q, k, v, selection=stats["selection"].indices)
    with pytest.raises(ValueError, match="selection.indices must have shape"):
        baatt.attention(q[:, :40], k, v, selection=stats["selection"])


# ---- regressions: each gave a silent wrong answer, a hidden NaN or an unclear error before --------


def _dense_nn(q, k, v, mask=None):
    """jax.nn.dot_product_attention with a key mask [B, Lk] (the behaviour baatt.attention follows)."""
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])


def test_closed_over_operands_under_jit():
    """q traced, k and v closed over: the host-side value check ran on the mix and raised TracerBoolConversionError."""
    q, k, v = make(np.random.default_rng(20), 1, 40, 40, 2, 1)
    cfg = baatt.BAConfig(block_size=16)
    out = jax.jit(lambda q: baatt.attention(q, k, v, config=cfg))(q)
    np.testing.assert_allclose(out, baatt.attention(q, k, v, config=cfg), rtol=1e-6, atol=1e-6)
    # The closed-over k holds a NaN that this traced call cannot check on the host: it reaches the output.
    k_nan = k.at[0, 3, 0, 0].set(jnp.nan)
    assert np.isnan(jax.jit(lambda q: baatt.attention(q, k_nan, v, config=cfg))(q)).all()


@pytest.mark.parametrize("sparsity", [None, 0.75])
def test_nonfinite_inputs_propagate_under_jit_like_jax_nn(sparsity):
    """A NaN key made its block mean NaN and the selector dropped that block (density 0.75 with BAConfig()); a
    NaN query row came out as zeros; gradients stayed finite. Now NaN reaches exactly the rows it reaches in
    jax.nn, whatever blocks are kept, and the gradients."""
    rng = np.random.default_rng(21)
    q, k, v = make(rng, 2, 48, 64, 4, 2)
    mask = jnp.asarray(np.arange(64)[None] < np.asarray([[64], [40]]))
    cfg = baatt.BAConfig(block_size=16, sparsity=sparsity)
    attend = jax.jit(lambda q, k, v: baatt.attention(q, k, v, config=cfg, key_mask=mask))
    planted = {
        "q row": (q.at[0, 7, 2, 3].set(jnp.nan), k, v),
        "k at a real key": (q, k.at[1, 5, 1, 0].set(jnp.nan), v),
        "v at a real key": (q, k, v.at[0, 60, 0, 2].set(jnp.nan)),
        "k in padding": (q, k.at[1, 50, 0, 0].set(jnp.nan), v),
    }
    for what, inputs in planted.items():
        np.testing.assert_array_equal(np.isnan(attend(*inputs)), np.isnan(_dense_nn(*inputs, mask)), err_msg=what)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2))(*planted["q row"])
    assert np.isnan(grads[0][0, 7, 2]).all() and np.isnan(grads[1][0, :, 1]).all()
    assert np.isfinite(grads[0][1]).all(), "batch row 1 does not see the NaN"
    err, _ = checkify.checkify(jax.jit(lambda q, k, v: baatt.attention(q, k, v, config=cfg, key_mask=mask,
                                                                         debug_checks=True)))(*planted["v at a real key"])
    with pytest.raises(Exception, match=r"v contains NaN or Inf at real key 60 \(batch 0, kv head 0\)"):
        err.throw()


def test_stats_leave_jit_and_vmap():
    """return_stats=True under jit failed: stats["implementation"] was a str, which jit cannot return."""
    q, k, v = make(np.random.default_rng(22), 2, 48, 48, 2, 1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5)
    out, stats = jax.jit(lambda q, k, v: baatt.attention(q, k, v, config=cfg, return_stats=True))(q, k, v)
    want_out, want = baatt.attention(q, k, v, config=cfg, return_stats=True)
    assert stats.implementation == stats["implementation"] == "reference"
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    for name in ("density", "lse"):
        np.testing.assert_allclose(stats[name], want[name], rtol=1e-6)
    np.testing.assert_array_equal(stats.selection.indices, want.selection.indices)
    _, per_row = jax.vmap(lambda q, k, v: baatt.attention(q[None], k[None], v[None], config=cfg, return_stats=True))(q, k, v)
    np.testing.assert_allclose(per_row.density[:, 0], want.density, rtol=1e-6)
    with pytest.raises(KeyError, match="no field 'indices'"):
        stats["indices"]


def test_selection_rules_eager_and_under_jit():
    """A selection listing block 0 twice ran and counted it twice; under jit an id out of range or a zero count
    gave zeros. Now eager calls raise, and under jit the query blocks concerned are NaN while the others are exact."""
    q, k, v = make(np.random.default_rng(23), 1, 64, 64, 2, 1)
    good = _hand_selection(1, 2, 4, {0, 2}, 16)
    with pytest.raises(ValueError, match=r"ascending order, each once .* query block 0 \(batch 0, head 0\) lists \[0, 0\]"):
        baatt.attention(q, k, v, selection=baatt.BlockSelection(
            jnp.zeros((1, 2, 4, 2), jnp.int32), jnp.full((1, 2, 4), 2, jnp.int32), block_q=16, block_k=16))
    with pytest.raises(ValueError, match=r"q_perm must hold a permutation of range\(64\)"):
        baatt.attention(q, k, v, selection=baatt.BlockSelection(
            good.indices, good.counts, q_perm=jnp.zeros((1, 2, 64), jnp.int32), block_q=16, block_k=16))
    indices = good.indices.at[0, 0, 1].set(jnp.asarray([2, 2])).at[0, 0, 2, 0].set(9)
    counts = good.counts.at[0, 1, 3].set(0).at[0, 1, 0].set(3)
    bad = baatt.BlockSelection(indices, counts, block_q=16, block_k=16)
    out = np.asarray(jax.jit(lambda s: baatt.attention(q, k, v, selection=s))(bad))
    want, _ = reference.block_sparse_attention(q, k, v, good)
    broken = np.zeros((64, 2), bool)
    broken[16:48, 0] = True  # head 0: a repeated id (block 1), an id out of range (block 2)
    broken[0:16, 1] = broken[48:64, 1] = True  # head 1: count above kmax (block 0), count 0 (block 3)
    assert np.isnan(out[0][broken]).all()
    np.testing.assert_allclose(out[0][~broken], np.asarray(want)[0][~broken], rtol=1e-6, atol=1e-6)
    not_a_permutation = baatt.BlockSelection(good.indices, good.counts, q_perm=jnp.zeros((1, 2, 64), jnp.int32),
                                             block_q=16, block_k=16)
    assert np.isnan(jax.jit(lambda s: baatt.attention(q, k, v, selection=s))(not_a_permutation)).all()


def test_scale_is_validated_and_a_traced_scale_follows_the_rules():
    """scale=nan gave a finite output."""
    q, k, v = make(np.random.default_rng(24), 1, 40, 40, 2, 1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5)
    with pytest.raises(ValueError, match="scale must be a finite positive number; got nan"):
        baatt.attention(q, k, v, config=cfg, scale=float("nan"))
    attend = jax.jit(lambda q, k, v, s: baatt.attention(q, k, v, config=cfg, scale=s))
    np.testing.assert_allclose(attend(q, k, v, 0.3), baatt.attention(q, k, v, config=cfg, scale=0.3),
                               rtol=1e-5, atol=1e-6)
    assert np.isnan(attend(q, k, v, jnp.nan)).all() and np.isnan(attend(q, k, v, -1.0)).all()


def test_config_field_types_are_validated():
    """BAConfig(seed=1.5) was accepted and failed inside the traced selector with a tracer TypeError."""
    with pytest.raises(ValueError, match=r"BAConfig.seed must be an int; got 1.5"):
        baatt.BAConfig(selector="random", sparsity=0.5, seed=1.5)
    with pytest.raises(ValueError, match=r"BAConfig.selector_params field seed of RandomParams must be an int"):
        baatt.BAConfig(selector="random", selector_params=baatt.selection.RandomParams(seed=1.5))


def test_sink_position_beyond_the_keys_is_refused():
    """sink_positions=(10**6,) on 64 keys was accepted and silently forced nothing."""
    q, k, v = _qkv()
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, force_sink=True, sink_positions=(0, 10**6))
    with pytest.raises(ValueError, match=r"BAConfig.sink_positions must lie below the key length 32"):
        baatt.attention(q, k, v, config=cfg)
    with pytest.raises(ValueError, match=r"BAConfig.sink_positions must lie below the key length 32"):
        baatt.select_blocks(q, k, cfg)
    with pytest.raises(ValueError, match=r"BAConfig.sink_positions must lie below the key length 32"):
        baatt.selection.block_map(q, k, cfg)


def test_array_like_key_mask():
    """A Python-list key_mask raised AttributeError."""
    q, k, v = _qkv()
    rows = [[i < 20 for i in range(32)]]
    np.testing.assert_array_equal(baatt.attention(q, k, v, key_mask=rows),
                                  baatt.attention(q, k, v, key_mask=jnp.asarray(rows)))


def test_key_mask_without_real_keys_gives_zeros_eager_and_under_jit():
    """An all-False key_mask raised in an eager call but returned zeros under jit: now zeros (lse -inf) in both."""
    q, k, v = make(np.random.default_rng(25), 2, 32, 32, 2, 1)
    mask = jnp.asarray(np.arange(32)[None] < np.asarray([[0], [32]]))
    for attend in (baatt.attention, jax.jit(baatt.attention, static_argnames="return_stats")):
        out, stats = attend(q, k, v, key_mask=mask, return_stats=True)
        np.testing.assert_array_equal(out[0], 0.0)
        assert np.isneginf(stats["lse"][0]).all()
        np.testing.assert_allclose(out[1], _dense_nn(q, k, v, mask)[1], rtol=1e-5, atol=1e-6)


def test_nan_query_message_names_the_row():
    """A NaN in q was reported "at real tokens", even at a row past the real keys: every query row is real."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q contains NaN or Inf at query row 30 \(batch 0, head 1\)"):
        baatt.attention(q.at[0, 30, 1, 4].set(jnp.nan), k, v, key_mask=jnp.arange(32)[None] < 8)
    with pytest.raises(ValueError, match=r"k contains NaN or Inf at real key 5 \(batch 0, kv head 0\)"):
        baatt.attention(q, k.at[0, 5, 0, 0].set(jnp.inf), v, key_mask=jnp.arange(32)[None] < 8)


def test_import_baatt_makes_nn_available():
    """baatt.nn needed its own import."""
    code = "import baatt; print(baatt.nn.ba_attention_fn.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "ba_attention_fn", done.stderr


def test_support_doc_is_generated_from_the_rules():
    """docs/support.md is what scripts/support_matrix.py writes from baatt.support_matrix()."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("support_matrix", root / "scripts" / "support_matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (root / "docs" / "support.md").read_text() == script.render(), "run python scripts/support_matrix.py"
    table = baatt.support_matrix()
    assert table["pallas"].head_dims == (64, 128) and table["reference"].head_dims is None
    assert table["mosaic_gpu"].dtypes == ("bfloat16", "float16")


def test_query_positions_steer_the_selector_and_follow_the_rules():
    """query_positions reach a selector that takes them (the output is the masked dense reference of the selection
    they give), under jit, vmap and grad; out-of-range values raise eagerly and poison the batch row under jit;
    every misuse names the argument."""
    q, k, v = make(np.random.default_rng(11), batch=2, lq=128, lk=128)
    cfg = baatt.BAConfig(selector="last_query", block_size=32, sparsity=0.5)
    front = jnp.arange(0, 16)[None]
    out, stats = baatt.attention(q, k, v, config=cfg, query_positions=front, return_stats=True,
                                 implementation="reference")
    from baatt.selection import last_query
    want = last_query.select(q, k, cfg, query_positions=front)
    np.testing.assert_array_equal(np.asarray(stats.selection.indices), np.asarray(want.indices))
    ref = reference.block_sparse_attention(q, k, v, want)[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    default = baatt.attention(q, k, v, config=cfg, return_stats=True, implementation="reference")[1].selection
    assert not np.array_equal(np.asarray(default.indices), np.asarray(want.indices))

    run = jax.jit(lambda q, p: baatt.attention(q, k, v, config=cfg, query_positions=p, implementation="reference"))
    np.testing.assert_allclose(np.asarray(run(q, front)), np.asarray(out), atol=2e-5, rtol=2e-5)
    per_row = jnp.asarray([[3, 4], [200, 5]])  # row 1 holds a position outside [0, 128)
    poisoned = np.asarray(run(q, per_row))
    assert np.all(np.isfinite(poisoned[0])) and np.all(np.isnan(poisoned[1]))
    rows = jnp.asarray([[3, 4], [7, 9]])
    one = lambda qq, kk, vv, p: baatt.attention(qq[None], kk[None], vv[None], config=cfg, query_positions=p[None],
                                                implementation="reference")[0]
    batched = jax.vmap(one)(q, k, v, rows)
    for b in range(2):
        np.testing.assert_allclose(np.asarray(batched[b]), np.asarray(one(q[b], k[b], v[b], rows[b])), atol=2e-5,
                                   rtol=2e-5)
    grad = jax.grad(lambda q: jnp.sum(run(q, front)))(q)
    dense_grad = jax.grad(lambda q: jnp.sum(reference.block_sparse_attention(q, k, v, want)[0]))(q)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(dense_grad), atol=2e-5, rtol=2e-4)

    with pytest.raises(ValueError, match=r"query_positions must lie in \[0, Lq=128\)"):
        baatt.attention(q, k, v, config=cfg, query_positions=jnp.asarray([[128]]))
    with pytest.raises(ValueError, match="query_positions must hold ints"):
        baatt.attention(q, k, v, config=cfg, query_positions=jnp.asarray([[1.0]]))
    with pytest.raises(ValueError, match=r"query_positions must have shape \[batch \(2\) or 1, m >= 1\]"):
        baatt.attention(q, k, v, config=cfg, query_positions=jnp.asarray([1, 2]))
    with pytest.raises(ValueError, match="selector 'baatt' estimates from queries of its own choice"):
        baatt.attention(q, k, v, config=cfg.replace(selector="baatt"), query_positions=front)
    with pytest.raises(ValueError, match="give query_positions without selection and head_budget"):
        baatt.attention(q, k, v, config=cfg, query_positions=front, selection=want)
