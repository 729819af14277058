"""Tail compensation (``BAConfig(tail="pooled")``): the reference against a NumPy brute force, through
``baatt.attention`` on every implementation that runs here, and its gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baatt
from baatt import AttentionMask, BlockSelection, reference, synthetic
from baatt.reference.tail import merge_partial, tail_compensated_attention

IMPLEMENTATIONS = ("reference", "pallas")  # the Pallas kernels in interpret mode on a CPU


def _inputs(length=100, q_heads=4, kv_heads=2, dim=16, seed=0, length_k=None):
    keys = jax.random.split(jax.random.key(seed), 3)
    length_k = length if length_k is None else length_k
    q = jax.random.normal(keys[0], (2, length, q_heads, dim))
    k = jax.random.normal(keys[1], (2, length_k, kv_heads, dim)) + 0.5  # a shared offset: blocks differ in mass
    v = jax.random.normal(keys[2], (2, length_k, kv_heads, dim))
    return q, k, v


def _random_selection(q, k, block_q, block_k, keep, seed, mask=baatt.attention_mask.BIDIRECTIONAL, perms=False):
    """``keep`` random key blocks per query block (ascending, padded with the last id), optionally with random
    permutations of queries and keys."""
    rng = np.random.default_rng(seed)
    b, lq, hq, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    ids = np.stack([np.sort(rng.permutation(nk)[:keep]) for _ in range(b * hq * nq)]).reshape(b, hq, nq, keep)
    counts = np.full((b, hq, nq), keep, np.int32)
    q_perm = np.stack([rng.permutation(lq) for _ in range(b * hq)]).reshape(b, hq, lq) if perms else None
    k_perm = np.stack([rng.permutation(lk) for _ in range(b * hkv)]).reshape(b, hkv, lk) if perms else None
    as_array = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    return BlockSelection(jnp.asarray(ids, jnp.int32), jnp.asarray(counts), as_array(q_perm), as_array(k_perm),
                          block_q, block_k, mask=mask)


def brute_force(q, k, v, selection, *, key_mask=None, group=None, refine=0, temperature=1.0):
    """float64, one query at a time: exact terms over the kept blocks' visible real keys, one pooled term per
    dropped group whose real keys the query sees all of (the ``refine`` top dropped blocks of the query block
    in groups, the other dropped blocks whole)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, lq, hq, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    real = np.ones((b, lk), bool) if key_mask is None else np.asarray(key_mask)
    if not selection.mask.is_bidirectional:  # keys that no query may see count as padding
        real = real & (np.arange(lk) < selection.mask.key_limit(lq - 1))
    temps = np.broadcast_to(np.asarray(temperature, np.float64), (hq,))
    out = np.zeros((b, lq, hq, v.shape[-1]))
    lse = np.full((b, hq, lq), -np.inf)
    for bi, h in np.ndindex(b, hq):
        g = h // (hq // hkv)
        q_order = np.arange(lq) if selection.q_perm is None else np.asarray(selection.q_perm[bi, h])
        k_order = np.arange(lk) if selection.k_perm is None else np.asarray(selection.k_perm[bi, g])
        out[bi, :, h], lse[bi, h] = _brute_force_head(
            q[bi, :, h], k[bi, :, g], v[bi, :, g], real[bi], q_order, k_order, np.asarray(selection.indices[bi, h]),
            np.asarray(selection.counts[bi, h]), selection, group=group, refine=refine, temperature=temps[h])
    return out, lse


def _brute_force_head(q, k, v, real, q_order, k_order, indices, counts, selection, *, group, refine, temperature):
    """out [Lq, Dv], lse [Lq] of one head (see ``brute_force``)."""
    lq, d = q.shape
    bq, bk, mask = selection.block_q, selection.block_k, selection.mask
    group = bk if group is None else group
    nq, nk = -(-lq // bq), -(-len(k) // bk)
    scale = 1.0 / math.sqrt(d)
    slots = np.full(nk * bk, -1)
    slots[: len(k)] = k_order
    sees = lambda i, j: mask.is_bidirectional or j < mask.key_limit(i)

    def real_keys(blk, start=0, width=bk):
        """Positions of the real keys in slots [start, start + width) of key block ``blk`` (block space)."""
        return [int(j) for j in slots[blk * bk + start: blk * bk + start + width] if j >= 0 and real[j]]

    def pooled(q_row, keys):
        return temperature * scale * q_row @ k[keys].mean(0) + math.log(len(keys)), v[keys].mean(0)

    out, lse = np.zeros((lq, v.shape[-1])), np.full(lq, -np.inf)
    for a in range(nq):
        rows = [int(i) for i in q_order[a * bq: (a + 1) * bq]]
        kept = set(indices[a, : counts[a]].tolist())
        dropped = [blk for blk in range(nk) if blk not in kept and real_keys(blk)]
        refined = set()
        if refine:
            last_limit = math.inf if mask.is_bidirectional else mask.key_limit((a + 1) * bq - 1)
            q_mean = q[rows].mean(0)
            rank = {blk: pooled(q_mean, real_keys(blk))[0] for blk in dropped if max(real_keys(blk)) < last_limit}
            refined = set(sorted(rank, key=lambda blk: (-rank[blk], blk))[:refine])
        for i in rows:
            terms = [(scale * q[i] @ k[j], v[j]) for blk in sorted(kept) for j in real_keys(blk) if sees(i, j)]
            for blk in dropped:
                width = group if (refine == 0 or blk in refined) else bk
                for start in range(0, bk, width):
                    keys = real_keys(blk, start, width)
                    if keys and all(sees(i, j) for j in keys):
                        terms.append(pooled(q[i], keys))
            if terms:
                logits = np.array([t[0] for t in terms])
                w = np.exp(logits - logits.max())
                lse[i] = logits.max() + math.log(w.sum())
                out[i] = (w[:, None] * np.stack([t[1] for t in terms])).sum(0) / w.sum()
    return out, lse


def _assert_matches(got, want, atol=2e-5):
    (out, lse), (want_out, want_lse) = got, want
    np.testing.assert_allclose(np.asarray(out), want_out, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("options", [
    dict(),
    dict(group=8),
    dict(group=4, refine=1),
    dict(temperature=(0.7, 1.0, 1.3, 2.0)),
])
def test_reference_matches_brute_force(options):
    """Ragged lengths (100 = 6 1/4 blocks of 16), GQA, padding keys, per-head selections."""
    q, k, v = _inputs()
    key_mask = np.ones((2, 100), bool)
    key_mask[1, 70:] = False
    key_mask[0, 20:36] = False  # a whole key block of padding: never pooled, never counted
    sel = _random_selection(q, k, 16, 16, keep=3, seed=1)
    got = tail_compensated_attention(q, k, v, sel, key_mask=jnp.asarray(key_mask), **options)
    _assert_matches(got, brute_force(q, k, v, sel, key_mask=key_mask, **options))


def test_reference_matches_brute_force_in_sorted_block_space():
    """The tail pools the dropped blocks of the selection's own block space (permuted tokens), and block sizes of
    queries and keys may differ."""
    q, k, v = _inputs(length=90, seed=2)
    sel = _random_selection(q, k, 32, 16, keep=2, seed=3, perms=True)
    for options in (dict(), dict(group=4, refine=2)):
        _assert_matches(tail_compensated_attention(q, k, v, sel, **options), brute_force(q, k, v, sel, **options))


@pytest.mark.parametrize("mask", [AttentionMask.causal(), AttentionMask.block_causal(32)])
def test_causal_tail_never_pools_a_future_key(mask):
    """Hand-made selections that drop blocks the mask cuts: a group enters a query's tail only when every real
    key of it is visible to that query, and changing a future key changes no output that may not see it."""
    q, k, v = _inputs(length=96, seed=4)
    sel = _random_selection(q, k, 16, 16, keep=2, seed=5, mask=mask)
    for options in (dict(), dict(group=8), dict(group=4, refine=1)):
        got = tail_compensated_attention(q, k, v, sel, **options)
        _assert_matches(got, brute_force(q, k, v, sel, **options))
    # Keys from position 48 on, made huge: queries that may not see them are unchanged.
    k2, v2 = k.at[:, 48:].mul(50.0), v.at[:, 48:].add(1e3)
    for options in (dict(), dict(group=8)):
        before, _ = tail_compensated_attention(q, k, v, sel, **options)
        after, _ = tail_compensated_attention(q, k2, v2, sel, **options)
        blind = np.asarray(mask.key_limit(np.arange(96))) <= 48
        np.testing.assert_array_equal(np.asarray(after)[:, blind], np.asarray(before)[:, blind])


def test_every_block_kept_changes_nothing():
    q, k, v = _inputs(seed=6)
    cfg = baatt.BAConfig(block_size=16)
    sel = baatt.select_blocks(q, k, cfg)
    out, lse = reference.block_sparse_attention(q, k, v, sel)
    t_out, t_lse = tail_compensated_attention(q, k, v, sel, group=4)
    np.testing.assert_array_equal(np.asarray(t_out), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(t_lse), np.asarray(lse))
    full, _ = baatt.attention(q, k, v, config=cfg.replace(tail="pooled"), return_stats=True)
    np.testing.assert_allclose(np.asarray(full), np.asarray(reference.dense_attention(q, k, v)[0]), atol=2e-6)


def test_padding_is_never_read():
    """NaN in masked keys and values leaves the output and the gradients finite and unchanged."""
    q, k, v = _inputs(seed=7)
    key_mask = jnp.arange(100)[None, :] < jnp.asarray([[60], [100]])
    cfg = baatt.BAConfig(block_size=16, sparsity=0.6, tail="pooled", tail_group=8)
    poison = lambda x: jnp.where(key_mask[:, :, None, None], x, jnp.nan)
    loss = lambda k, v: jnp.sum(baatt.attention(q, k, v, config=cfg, key_mask=key_mask) ** 2)
    clean, grads = jax.value_and_grad(loss, argnums=(0, 1))(k, v)
    dirty, dirty_grads = jax.value_and_grad(loss, argnums=(0, 1))(poison(k), poison(v))
    assert np.isfinite(float(dirty)) and float(dirty) == pytest.approx(float(clean), rel=1e-6)
    for g, dg in zip(grads, dirty_grads):
        np.testing.assert_allclose(np.asarray(dg), np.asarray(g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_attention_routes_the_tail_through_every_implementation(implementation):
    """baatt.attention(tail="pooled") = the reference on the same selection, with its lse, on any backend."""
    q, k, v = _inputs(length=128, dim=64, seed=8)
    for cfg in (baatt.BAConfig(block_size=32, sparsity=0.7, tail="pooled"),
                baatt.BAConfig(block_size=32, sparsity=0.7, tail="pooled", tail_group=8, tail_refine=1,
                               sort_q=True, sort_k=True),
                baatt.BAConfig(block_size=32, sparsity=0.5, tail="pooled", mask=AttentionMask.causal())):
        out, stats = baatt.attention(q, k, v, config=cfg, implementation=implementation, return_stats=True,
                                     interpret=implementation == "pallas")
        want_out, want_lse = tail_compensated_attention(q, k, v, stats.selection, group=cfg.tail_group,
                                                        refine=cfg.tail_refine)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(stats.lse), np.asarray(want_lse), atol=2e-5, rtol=1e-4)
        plain, plain_stats = baatt.attention(q, k, v, config=cfg.replace(tail="none", tail_group=None, tail_refine=0),
                                             implementation=implementation, return_stats=True,
                                             interpret=implementation == "pallas")
        # The pooled terms only add mass: the lse never falls, and the selection is the same.
        assert np.all(np.asarray(stats.lse) >= np.asarray(plain_stats.lse) - 1e-5)
        np.testing.assert_array_equal(np.asarray(stats.selection.indices), np.asarray(plain_stats.selection.indices))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tail_gradients_match_the_reference(implementation):
    """The tail is plain JAX after the operator: gradients through a custom-VJP kernel and through the pooled part
    agree with autodiff of the reference."""
    q, k, v = _inputs(length=96, dim=64, seed=9)
    cfg = baatt.BAConfig(block_size=32, sparsity=0.6, tail="pooled", tail_group=16)
    sel = baatt.select_blocks(q, k, cfg)
    weights = jax.random.normal(jax.random.key(10), (2, 96, 4, 64))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    attend = lambda q, k, v: baatt.attention(q, k, v, config=cfg, selection=sel, implementation=implementation,
                                             interpret=implementation == "pallas")
    spec = lambda q, k, v: tail_compensated_attention(q, k, v, sel, group=16)[0]
    got = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(spec), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-3, err_msg=f"d{name}")
        assert np.abs(np.asarray(w)).max() > 0


def test_merge_partial_is_attention_over_the_union():
    """Two disjoint key sets merged from their (out, lse) give attention over both; an empty side is ignored."""
    q, k, v = _inputs(length=40, seed=11)
    first = jnp.arange(40) < 25
    both = reference.dense_attention(q, k, v)
    parts = [reference.dense_attention(q, k, v, key_mask=jnp.broadcast_to(m, (2, 40))) for m in (first, ~first)]
    out, lse = merge_partial(*parts[0], *parts[1])
    np.testing.assert_allclose(np.asarray(out), np.asarray(both[0]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(both[1]), atol=2e-6)
    empty = (jnp.zeros_like(both[0]), jnp.full_like(both[1], -jnp.inf))
    out, lse = merge_partial(*both, *empty)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(both[0]))
    out, lse = merge_partial(*empty, *empty)
    assert not np.any(np.asarray(out)) and np.all(np.isneginf(np.asarray(lse)))


def test_tail_lowers_the_error_on_structured_inputs():
    """On the structured synthetic inputs (topic segments, a local band, heavy-tailed norms, sinks) the pooled
    tail lowers the output error of a mean-pooling selection with the sink forced."""
    q, k, v = synthetic.attention_inputs(synthetic.SyntheticConfig(length=1024, q_heads=2, kv_heads=2, head_dim=32))
    dense, _ = reference.dense_attention(q, k, v)
    error = lambda cfg: float(reference.error.relative_output_error(baatt.attention(q, k, v, config=cfg), dense))
    for s in (0.7, 0.9):
        cfg = baatt.BAConfig(block_size=64, sparsity=s, force_sink=True)
        assert error(cfg.replace(tail="pooled")) < error(cfg)


def test_config_rules():
    assert baatt.BAConfig().tail == "none"
    baatt.BAConfig(block_size=64, tail="pooled", tail_group=16, tail_refine=2, tail_temperature=(1.0, 1.5))
    bad = [
        (dict(tail="mean"), "BAConfig.tail must be one of"),
        (dict(tail="pooled", tail_group=24), "tail_group must be None or a power of two dividing the key block"),
        (dict(tail="pooled", tail_group=128), "tail_group must be None or a power of two dividing the key block"),
        (dict(tail="pooled", tail_refine=1), "tail_refine needs a tail_group smaller than the key block"),
        (dict(tail="pooled", tail_group=16, tail_refine=-1), "tail_refine must be an int >= 0"),
        (dict(tail="pooled", tail_temperature=0.0), "tail_temperature must be a finite number > 0"),
        (dict(tail="pooled", tail_temperature=()), "tail_temperature must be a finite number > 0"),
        (dict(tail_group=16), "tail_group applies to tail='pooled' only"),
        (dict(tail_temperature=2.0), "tail_temperature applies to tail='pooled' only"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            baatt.BAConfig(block_size=64, **fields)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"one number or one per query head \(4\); got shape \(2,\)"):
        baatt.attention(q, k, v, config=baatt.BAConfig(block_size=16, sparsity=0.5, tail="pooled",
                                                      tail_temperature=(1.0, 2.0)))
