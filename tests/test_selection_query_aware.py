"""Query-aware selection: per-query tail metrics, the max-oracle, the token-level estimators
(query_token, quest, mixed, proxy) and the peak-relative keep rule.

Each is checked against a float64 NumPy version written here from the module docstrings'
formulas (loops, small sizes): the block scores or masses, and the exact set of kept blocks
under the shared budget rules. Rows whose selection is decided by a near-tie (a score gap or
a mass within float32 noise of a cut) are not compared exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baatt
from baatt.reference import error
from baatt.selection import (
    MixedParams,
    ProxyParams,
    QueryTokenParams,
    QuestParams,
    block_map,
    max_oracle,
    mixed,
    pooled_query,
    proxy,
    query_token,
    quest,
    select_blocks,
    select_from_scores,
)
from baatt.selection.estimator import sort_permutations
from tests import bruteforce as bf

# -- inputs -------------------------------------------------------------------------------------


def make_inputs(seed, batch, lq, lk, hq, hkv, d, block, *, mask=None, structure=2.5):
    """q, k float32 with block structure (a random offset of random strength per block), and a key mask:
    None, "pad" (each batch row a random real length) or "holes" (padding and scattered masked keys)."""
    rng = np.random.default_rng(seed)

    def tokens(length, heads):
        nb = -(-length // block)
        offset = rng.normal(size=(batch, nb, heads, d)) * rng.uniform(0.0, structure, size=(batch, nb, heads, 1))
        return (rng.normal(size=(batch, nb * block, heads, d)) + np.repeat(offset, block, axis=1))[:, :length]

    q, k = tokens(lq, hq).astype(np.float32), tokens(lk, hkv).astype(np.float32)
    key_mask = None
    if mask is not None:
        lengths = rng.integers(lk // 2, lk + 1, size=batch)
        key_mask = np.arange(lk)[None, :] < lengths[:, None]
        if mask == "holes":
            key_mask &= rng.uniform(size=key_mask.shape) > 0.15
            key_mask[:, 0] = True
    return q, k, key_mask


# Shapes: GQA, batch > 1, ragged lengths, Lq != Lk, block_q != block_k, key padding with holes.
PROBLEMS = {
    "gqa_holes": dict(seed=1, batch=2, lq=150, lk=150, hq=4, hkv=2, d=16, bq=32, bk=32, mask="holes"),
    "cross_ragged": dict(seed=2, batch=1, lq=200, lk=130, hq=2, hkv=1, d=16, bq=32, bk=16, mask=None),
    "mha_pad": dict(seed=3, batch=1, lq=256, lk=256, hq=2, hkv=2, d=8, bq=64, bk=32, mask="pad"),
}


def problem(name):
    p = PROBLEMS[name]
    q, k, key_mask = make_inputs(p["seed"], p["batch"], p["lq"], p["lk"], p["hq"], p["hkv"], p["d"],
                                 min(p["bq"], p["bk"]), mask=p["mask"])
    return q, k, key_mask, p["bq"], p["bk"]


def jnp_args(q, k, key_mask):
    return jnp.asarray(q), jnp.asarray(k), None if key_mask is None else jnp.asarray(key_mask)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _scores_and_selection(module, q, k, key_mask, config):
    """A selector module's block scores (or scores and mass) and its selection, in one compiled program."""
    return module.block_scores(q, k, config, key_mask=key_mask), module.select(q, k, config, key_mask=key_mask)


# -- NumPy references -------------------------------------------------------------------------------


def np_valid_keys(key_mask, batch, lk):
    return np.ones((batch, lk), bool) if key_mask is None else np.asarray(key_mask)


def np_blocks(length, block):
    return [list(range(s, min(s + block, length))) for s in range(0, length, block)]


def np_softmax_rows(q, k, valid, scale, visible=None):
    """Exact attention rows [Lq, Lk] of one head (float64); masked keys, and keys ``visible`` [Lq, Lk]
    hides from a row, get 0."""
    s = q @ k.T * scale
    s[:, ~valid] = -np.inf
    if visible is not None:
        s[~visible] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def np_log_softmax(x):
    finite = np.isfinite(x)
    out = np.full_like(x, -np.inf)
    m = x[finite].max()
    out[finite] = x[finite] - m - np.log(np.exp(x[finite] - m).sum())
    return out


def np_aggregate(token_logits, aggregate):
    """[n_queries, Nk] per-token block logits -> [Nk] block scores (query_token's three aggregates)."""
    with np.errstate(divide="ignore"):
        if aggregate == "logsumexp":
            m = token_logits.max(0)
            safe = np.where(np.isfinite(m), m, 0.0)
            return np.where(np.isfinite(m), safe + np.log(np.exp(token_logits - safe).sum(0)), -np.inf)
        p = np.exp(np.stack([np_log_softmax(row) for row in token_logits]))
        return np.log(p.max(0) if aggregate == "max" else p.mean(0))


def np_token_scores(q, k, key_mask, bq, bk, aggregate, score_fn, visible=None):
    """Block scores [B, Hq, Nq, Nk] from per-token block logits ``score_fn(q_i [D], keys [n, D]) -> float``
    over the valid keys of the block that the token may see (``visible`` [Lq, Lk], None: all)."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    qb, kb = np_blocks(lq, bq), np_blocks(lk, bk)
    out = np.full((batch, hq, len(qb), len(kb)), -np.inf)
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, hkv)):
            for a, qi in enumerate(qb):
                tok = np.full((len(qi), len(kb)), -np.inf)
                for t, i in enumerate(qi):
                    for c, kj in enumerate(kb):
                        seen = [j for j in kj if valid[b, j] and (visible is None or visible[i, j])]
                        if seen:
                            tok[t, c] = score_fn(q[b, i, h].astype(np.float64), k[b, seen, g].astype(np.float64))
                out[b, h, a] = np_aggregate(tok, aggregate)
    return out


def np_query_token(q, k, key_mask, bq, bk, aggregate, variance_weight, visible=None):
    d = q.shape[-1]

    def score(qi, keys):
        s = qi @ keys.mean(0) / math.sqrt(d) + math.log(len(keys))
        return s + variance_weight * np.sum(qi**2 * keys.var(0)) / d

    return np_token_scores(q, k, key_mask, bq, bk, aggregate, score, visible)


def np_quest(q, k, key_mask, bq, bk, aggregate, visible=None):
    d = q.shape[-1]

    def score(qi, keys):
        bound = np.sum(np.maximum(qi * keys.max(0), qi * keys.min(0))) / math.sqrt(d)
        assert bound >= (keys @ qi).max() / math.sqrt(d) - 1e-9  # it is an upper bound
        return bound + math.log(len(keys))

    return np_token_scores(q, k, key_mask, bq, bk, aggregate, score, visible)


def np_max_oracle(q, k, key_mask, bq, bk, visible=None):
    """M_max [B, Hq, Nq, Nk]: per query block, the largest per-query mass on each key block."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    qb, kb = np_blocks(lq, bq), np_blocks(lk, bk)
    out = np.zeros((batch, hq, len(qb), len(kb)))
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, hkv)):
            a_full = np_softmax_rows(q[b, :, h].astype(np.float64), k[b, :, g].astype(np.float64), valid[b],
                                     1 / math.sqrt(d), visible)
            for a, qi in enumerate(qb):
                for c, kj in enumerate(kb):
                    out[b, h, a, c] = a_full[np.ix_(qi, kj)].sum(1).max()
    return out


def np_mixed(q, k, key_mask, bq, bk, probes, group, visible=None):
    """(P, G) [B, Hq, Nq, Nk]: the probe mass and the group-pooled mass of the mixed selector.

    Under ``visible`` [Lq, Lk] a query group pools only the key groups whose every key its first
    query may see, and a query group that sees none drops out of its block's average."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    qb, kb = np_blocks(lq, bq), np_blocks(lk, bk)
    probe, pooled = (np.zeros((batch, hq, len(qb), len(kb))) for _ in range(2))
    key_groups = np_blocks(lk, group)
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, hkv)):
            qh, kh = q[b, :, h].astype(np.float64), k[b, :, g].astype(np.float64)
            a_full = np_softmax_rows(qh, kh, valid[b], 1 / math.sqrt(d), visible)
            kg = [[j for j in grp if valid[b, j]] for grp in key_groups]
            for a, qi in enumerate(qb):
                rows = [qi[min((2 * t + 1) * bq // (2 * probes), len(qi) - 1)] for t in range(probes)]
                for c, kj in enumerate(kb):
                    probe[b, h, a, c] = a_full[np.ix_(rows, kj)].sum() / probes
                mass, weight = np.zeros(len(kb)), 0
                for qgrp in np_blocks(len(qi), group):
                    first = qi[qgrp[0]]
                    seen = [valid_grp if visible is None or visible[first, grp].all() else []
                            for grp, valid_grp in zip(key_groups, kg)]
                    if not any(seen):
                        continue
                    qmean = qh[[qi[t] for t in qgrp]].mean(0)
                    logits = np.array([qmean @ kh[grp].mean(0) / math.sqrt(d) + math.log(len(grp)) if grp
                                       else -np.inf for grp in seen])
                    p = np.exp(np_log_softmax(logits))
                    for gi, grp in enumerate(key_groups):
                        mass[grp[0] // bk] += p[gi] * len(qgrp)
                    weight += len(qgrp)
                pooled[b, h, a] = mass / max(weight, 1)
    return probe, pooled


def np_pooled_query(q, k, key_mask, bq, bk, visible=None):
    """P [B, Hq, Nq, Nk]: the softmax of each query block's mean query over the valid keys its last query
    may see, summed over each key block."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    qb, kb = np_blocks(lq, bq), np_blocks(lk, bk)
    out = np.zeros((batch, hq, len(qb), len(kb)))
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, hkv)):
            kh = k[b, :, g].astype(np.float64)
            for a, qi in enumerate(qb):
                qmean = q[b, qi, h].astype(np.float64).mean(0)
                seen = valid[b] & (True if visible is None else visible[qi[-1]])
                p = np_softmax_rows(qmean[None], kh, seen, 1 / math.sqrt(d))[0]
                out[b, h, a] = [p[kj].sum() for kj in kb]
    return out


def np_proxy(q, k, key_mask, bq, bk, stride, kv_heads_per_proxy, visible=None):
    """log S [B, Hq, Nq, Nk] of the proxy selector."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    qb, kb = np_blocks(lq, bq), np_blocks(lk, bk)
    out = np.full((batch, hq, len(qb), len(kb)), -np.inf)
    per_proxy = hq // hkv * kv_heads_per_proxy
    for b in range(batch):
        for p in range(hkv // kv_heads_per_proxy):
            heads = range(p * per_proxy, (p + 1) * per_proxy)
            qp = q[b][:, list(heads)].astype(np.float64).mean(1)
            kp = k[b, :, p * kv_heads_per_proxy : (p + 1) * kv_heads_per_proxy].astype(np.float64).mean(1)
            a_full = np_softmax_rows(qp, kp, valid[b], 1 / math.sqrt(d), visible)
            for a, qi in enumerate(qb):
                rows = sorted({qi[min(t, len(qi) - 1)] for t in range(stride - 1, bq, stride)})
                for c, kj in enumerate(kb):
                    if valid[b, kj].any() and (visible is None or visible[np.ix_(rows, kj)].any()):
                        with np.errstate(divide="ignore"):
                            out[b, heads, a, c] = np.log(a_full[np.ix_(rows, kj)].max())
    return out


def np_kmax(config, nk):
    if config.sparsity is not None:
        kappa = math.ceil(round((1 - config.sparsity) * nk, 9))
    elif (config.tau is not None or config.peak_margin is not None) and config.max_blocks is not None:
        kappa = config.max_blocks
    else:
        kappa = nk
    forced = (len(set(config.sink_positions)) if config.force_sink else 0) + (
        2 * config.local_window + 1 if config.local_window else 0)
    return max(1, min(max(kappa, forced), nk))


def np_forced(config, lq, lk):
    nq, nk = -(-lq // config.block_q), -(-lk // config.block_k)
    forced = np.zeros((nq, nk), bool)
    if config.force_sink:
        for pos in config.sink_positions:
            if pos < lk:
                forced[:, pos // config.block_k] = True
    if config.local_window:
        for a in range(nq):
            centre = min(a * config.block_q + config.block_q // 2, lk - 1) // config.block_k
            forced[a] |= np.abs(np.arange(nk) - centre) <= config.local_window
    return forced


def np_keep(priority, mass, forced, config):
    """Kept block ids of one row under the config's rule, and whether a near-tie decides them.

    priority: float per block (-inf = no valid key; larger first, ties to the lower id);
    mass: per-block mass (normalised here over the valid blocks); forced: bool per block.
    """
    nk = len(priority)
    valid = np.isfinite(priority)
    forced = forced & valid
    kmax = np_kmax(config, nk)
    order = sorted(np.flatnonzero(valid), key=lambda c: (not forced[c], -priority[c], c))
    m = np.where(valid, mass, 0.0)
    m = m / m.sum() if m.sum() > 0 else m
    fragile = False
    if config.tau is not None:
        cum = np.cumsum(m[order])[:kmax]
        reach = np.flatnonzero(cum >= config.tau - 1e-6)
        count = min(max(int(reach[0]) + 1 if reach.size else kmax, config.min_blocks), kmax)
        count = max(count, int(forced.sum()))
        fragile |= bool(np.any(np.abs(cum - config.tau) < 2e-5))
    elif config.peak_margin is not None:
        with np.errstate(divide="ignore"):
            log_m = np.log(m)
        peak = int(np.argmax(np.where(valid, log_m, -np.inf)))
        cut = log_m[peak] - config.peak_margin
        count = int(np.sum(valid & ((log_m >= cut) | forced)))
        count = min(max(count, config.min_blocks), kmax)
        others = valid & (np.arange(nk) != peak)
        fragile |= bool(np.any(np.abs(log_m[others] - cut) < 1e-4))
    else:
        count = kmax
    count = max(min(count, len(order)), 1)
    if count < len(order):
        last, nxt = order[count - 1], order[count]
        fragile |= forced[last] == forced[nxt] and abs(priority[last] - priority[nxt]) < 1e-4
    return set(order[:count]), fragile


def compare_selection(sel, priority, mass, config, lq, lk, *, max_fragile=0.25):
    """Exact kept sets against ``np_keep`` on every row not decided by a near-tie; returns #rows compared."""
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    forced = np_forced(config, lq, lk)
    assert idx.shape[-1] == np_kmax(config, priority.shape[-1])
    compared = fragile = 0
    for b, h, a in np.ndindex(*cnt.shape):
        want, near_tie = np_keep(priority[b, h, a], mass[b, h, a], forced[a], config)
        got = set(idx[b, h, a, : cnt[b, h, a]].tolist())
        assert len(got) == cnt[b, h, a], "kept ids must be distinct"
        if near_tie:
            fragile += 1
            continue
        compared += 1
        assert got == want, ((b, h, a), sorted(got), sorted(want))
    assert fragile <= max_fragile * cnt.size + 1
    return compared


def softmax_rows(scores):
    with np.errstate(invalid="ignore"):
        e = np.exp(scores - scores.max(-1, keepdims=True))
    e = np.where(np.isfinite(scores), e, 0.0)
    return e / e.sum(-1, keepdims=True)


def assert_scores_close(got, want, atol=2e-4):
    got = np.asarray(got)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=1e-4)


# Budget rules the selectors are compared under (each with forced blocks too).
RULES = {
    "sparsity+local": dict(sparsity=0.6, local_window=1),
    "tau": dict(tau=0.8, max_blocks=4),
    "peak+sink": dict(peak_margin=1.5, force_sink=True, min_blocks=2),
}

# -- per-query mass and its tails -------------------------------------------------------------------


@pytest.mark.parametrize("sort", [False, True])
def test_query_mass_matches_numpy(sort):
    q, k, key_mask, bq, bk = problem("gqa_holes")
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, sparsity=0.6, sort_q=sort, sort_k=sort)
    jq, jk, jm = jnp_args(q, k, key_mask)
    sel = select_blocks(jq, jk, config, key_mask=jm)
    got = np.asarray(error.query_mass(jq, jk, sel, key_mask=jm))
    batch, lq, hq, d = q.shape
    valid = np_valid_keys(key_mask, batch, k.shape[1])
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    want = np.zeros((batch, hq, lq))
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, k.shape[2])):
            a_full = np_softmax_rows(q[b, :, h].astype(np.float64), k[b, :, g].astype(np.float64), valid[b],
                                     1 / math.sqrt(d))
            qb = bf.blocks(None if sel.q_perm is None else np.asarray(sel.q_perm)[b, h], lq, bq)
            kb = bf.blocks(None if sel.k_perm is None else np.asarray(sel.k_perm)[b, g], k.shape[1], bk)
            for a, qi in enumerate(qb):
                keys = [j for c in idx[b, h, a, : cnt[b, h, a]] for j in kb[c]]
                want[b, h, qi] = a_full[np.ix_(qi, keys)].sum(1)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # Averaged over the queries of each block, it is the oracle mass the selection keeps.
    m_hat = baatt.reference.post_downsample_map(jq, jk, block_size=bq, block_size_k=bk, key_mask=jm,
                                                q_perm=sel.q_perm, k_perm=sel.k_perm)
    if not sort:
        per_block = np.asarray(error.selected_mass(m_hat, sel))
        whole = lq // bq  # the last query block is ragged
        np.testing.assert_allclose(got[..., : whole * bq].reshape(batch, hq, whole, bq).mean(-1),
                                   per_block[..., :whole], atol=2e-6)


def test_query_mass_every_block_kept_is_one():
    q, k, key_mask, bq, bk = problem("cross_ragged")
    jq, jk, jm = jnp_args(q, k, key_mask)
    sel = select_blocks(jq, jk, baatt.BAConfig(block_size=bq, block_size_k=bk, selector="dense"), key_mask=jm)
    np.testing.assert_allclose(np.asarray(error.query_mass(jq, jk, sel, key_mask=jm)), 1.0, atol=2e-6)


def test_query_mass_tails():
    mass = jnp.asarray(np.linspace(0.0, 1.0, 101).reshape(1, 1, 101))
    tails = error.query_mass_tails(mass)
    assert math.isclose(float(tails["mean"]), 0.5, abs_tol=1e-6)
    assert math.isclose(float(tails["low_quantile"]), 0.05, abs_tol=1e-6)
    assert math.isclose(float(tails["below_threshold"]), 50 / 101, abs_tol=1e-6)
    assert math.isclose(float(error.query_mass_tails(mass, quantile=0.5, threshold=0.9)["below_threshold"]),
                        90 / 101, abs_tol=1e-6)
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
        error.query_mass_tails(mass, quantile=5)


# -- the max-oracle ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,rule", [("gqa_holes", "tau"), ("cross_ragged", "peak+sink"),
                                       ("mha_pad", "sparsity+local")])
def test_max_oracle_matches_numpy(name, rule):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="max_oracle", **RULES[rule])
    args = jnp_args(q, k, key_mask)
    scores, sel = _scores_and_selection(max_oracle, *args, config)
    want = np_max_oracle(q, k, key_mask, bq, bk)
    with np.errstate(divide="ignore"):
        log_want = np.where(want > 0, np.log(want), -np.inf)
    valid = np.isfinite(np.asarray(scores))
    np.testing.assert_allclose(np.exp(np.asarray(scores)), want, atol=2e-6, rtol=1e-4)
    assert np.array_equal(valid, want > 0)
    assert compare_selection(sel, log_want, want, config, q.shape[1], k.shape[1]) > 0
    got_map = np.asarray(block_map(*args[:2], config, key_mask=args[2]))
    np.testing.assert_allclose(got_map, want / want.sum(-1, keepdims=True), atol=2e-6, rtol=1e-4)


def _needle(key_side: str, length=256, block=32, d=16, seed=0):
    """Block-structured background (a strong offset per block, as topics or a local band make) and one
    query of block 2 that needs key block 5: it shares a strong direction with one key of the block
    (``key_side="token"``) or with every key of it (``"block"``).

    Mean pooling averages the query away among its block's offsets; an estimator that keeps the
    query (and, for a one-key needle, the key) whole sees the pair."""
    q, k, _ = make_inputs(seed, 1, length, length, 1, 1, d, block, structure=3.0)
    q, k = q * 0.5, k * 0.5
    direction = np.random.default_rng(seed + 1).normal(size=d)
    direction *= 10.0 / np.linalg.norm(direction)
    q[0, 2 * block + 7, 0] += direction
    if key_side == "token":
        k[0, 5 * block + 11, 0] += direction
    else:
        k[0, 5 * block : 6 * block, 0] += 0.5 * direction
    return jnp.asarray(q), jnp.asarray(k)


@pytest.mark.parametrize("key_side,selector,params", [
    ("token", "max_oracle", None), ("token", "quest", QuestParams(aggregate="max")),
    ("token", "proxy", ProxyParams(stride=1)),
    ("block", "max_oracle", None), ("block", "query_token", QueryTokenParams(aggregate="max")),
])
def test_needle_found_where_mean_pooling_loses_it(key_side, selector, params):
    q, k = _needle(key_side)
    budget = dict(block_size=32, sparsity=0.75)

    def kept(config):
        sel = select_blocks(q, k, config)
        return set(np.asarray(sel.indices)[0, 0, 2].tolist())

    assert 5 not in kept(baatt.BAConfig(selector="meanpool", **budget))
    assert 5 in kept(baatt.BAConfig(selector=selector, selector_params=params, **budget))


# -- query_token and quest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate,variance_weight,name,rule", [
    ("mean", 0.0, "gqa_holes", "sparsity+local"),
    ("max", 0.5, "cross_ragged", "tau"),
    ("logsumexp", 1.0, "mha_pad", "peak+sink"),
])
def test_query_token_matches_numpy(aggregate, variance_weight, name, rule):
    q, k, key_mask, bq, bk = problem(name)
    params = QueryTokenParams(aggregate=aggregate, variance_weight=variance_weight)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="query_token", selector_params=params,
                            **RULES[rule])
    scores, sel = _scores_and_selection(query_token, *jnp_args(q, k, key_mask), config)
    want = np_query_token(q, k, key_mask, bq, bk, aggregate, variance_weight)
    assert_scores_close(scores, want)
    assert compare_selection(sel, want, softmax_rows(want), config, q.shape[1], k.shape[1]) > 0


@pytest.mark.parametrize("aggregate,name,rule", [
    ("mean", "gqa_holes", "peak+sink"), ("max", "mha_pad", "tau"), ("logsumexp", "cross_ragged", "sparsity+local"),
])
def test_quest_matches_numpy(aggregate, name, rule):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="quest",
                            selector_params=QuestParams(aggregate=aggregate), **RULES[rule])
    scores, sel = _scores_and_selection(quest, *jnp_args(q, k, key_mask), config)
    want = np_quest(q, k, key_mask, bq, bk, aggregate)
    assert_scores_close(scores, want)
    assert compare_selection(sel, want, softmax_rows(want), config, q.shape[1], k.shape[1]) > 0


def test_count_correction_switch():
    """Without count_correction the per-token scores drop log n_b: only ragged blocks change rank."""
    q, k, key_mask, bq, bk = problem("gqa_holes")
    args = jnp_args(q, k, key_mask)
    for module, params in ((query_token, QueryTokenParams(aggregate="logsumexp")),
                           (quest, QuestParams(aggregate="logsumexp"))):
        name = module.__name__.rsplit(".", 1)[-1]
        on = baatt.BAConfig(block_size=bq, selector=name, selector_params=params)
        with_count = np.asarray(module.block_scores(*args[:2], on, key_mask=args[2]))
        without = np.asarray(module.block_scores(*args[:2], on.replace(count_correction=False), key_mask=args[2]))
        counts = np.stack([np.add.reduceat(row, np.arange(0, row.size, bk)) for row in key_mask]).astype(float)
        finite = np.isfinite(with_count)
        diff = (with_count - np.where(finite, without, 0.0))[finite]
        with np.errstate(divide="ignore"):
            log_counts = np.broadcast_to(np.log(counts)[:, None, None, :], with_count.shape)
        np.testing.assert_allclose(diff, log_counts[finite], atol=1e-4)


# -- mixed ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probes,group,blend,name,rule", [
    (1, 16, None, "gqa_holes", "sparsity+local"),
    (3, 8, None, "mha_pad", "tau"),
    (2, 16, 0.3, "cross_ragged", "peak+sink"),
])
def test_mixed_matches_numpy(probes, group, blend, name, rule):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="mixed",
                            selector_params=MixedParams(probes=probes, group=group, blend=blend), **RULES[rule])
    (scores, mass), sel = _scores_and_selection(mixed, *jnp_args(q, k, key_mask), config)
    probe, pooled = np_mixed(q, k, key_mask, bq, bk, probes, group)
    w = 0.5 if blend is None else blend
    want_mass = w * probe + (1 - w) * pooled
    np.testing.assert_allclose(np.asarray(mass), want_mass, atol=2e-6, rtol=1e-4)
    if blend is None:
        # Interleaved: P's best, G's best, P's second, ... (a block takes its first place).
        priority = np.full(probe.shape, -np.inf)
        compared = 0
        for idx in np.ndindex(*probe.shape[:3]):
            valid = want_mass[idx] > 0
            ranks = [sorted(np.flatnonzero(valid), key=lambda c, m=m: (-m[c], c)) for m in (probe[idx], pooled[idx])]
            for place in range(2 * len(ranks[0])):
                c = ranks[place % 2][place // 2]
                priority[idx + (c,)] = max(priority[idx + (c,)], -place)
            near_tie = any(np.min(np.abs(np.diff(m[idx][r]))) < 1e-5 for m, r in zip((probe, pooled), ranks))
            if not near_tie:
                compared += 1
                assert np.array_equal(np.asarray(scores)[idx], priority[idx]), idx
        assert compared >= 0.75 * np.prod(probe.shape[:3])
    else:
        with np.errstate(divide="ignore"):
            priority = np.log(want_mass)
        assert_scores_close(scores, priority)
    assert compare_selection(sel, priority, want_mass, config, q.shape[1], k.shape[1]) > 0


def test_mixed_splits_a_fixed_budget_between_the_estimates():
    q, k, key_mask, bq, bk = problem("mha_pad")
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, sparsity=0.5, selector="mixed")
    args = jnp_args(q, k, key_mask)
    log_p, log_g = (np.asarray(x) for x in mixed.log_masses(*args[:2], config, key_mask=args[2]))
    sel = select_blocks(*args[:2], config, key_mask=args[2])
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    for row in np.ndindex(*cnt.shape):
        n = int(cnt[row])
        kept = set(idx[row][:n].tolist())
        best_probe = set(np.argsort(-log_p[row], kind="stable")[: -(-n // 2)].tolist())
        best_group = set(np.argsort(-log_g[row], kind="stable")[: n // 2].tolist())
        assert best_probe <= kept  # the probe's best half is always there
        assert len(kept & best_group) >= 1


# -- proxy ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=3)
def _pooled_query(q, k, key_mask, config):
    return pooled_query.log_mass(q, k, config, key_mask=key_mask), pooled_query.select(q, k, config, key_mask=key_mask)


@pytest.mark.parametrize("name,rule", [("gqa_holes", "sparsity+local"), ("mha_pad", "tau"),
                                       ("cross_ragged", "peak+sink")])
def test_pooled_query_matches_numpy(name, rule):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="pooled_query", **RULES[rule])
    log_mass, sel = _pooled_query(*jnp_args(q, k, key_mask), config)
    want = np_pooled_query(q, k, key_mask, bq, bk)
    np.testing.assert_allclose(np.exp(np.asarray(log_mass)), want, atol=2e-6, rtol=1e-4)
    with np.errstate(divide="ignore"):
        priority = np.log(want)
    assert compare_selection(sel, priority, want, config, q.shape[1], k.shape[1]) > 0
    jq, jk, jm = jnp_args(q, k, key_mask)
    np.testing.assert_allclose(np.asarray(block_map(jq, jk, config, key_mask=jm)), want, atol=2e-6, rtol=1e-4)


def np_pooled_query_ordered(q, k, key_mask, bq, bk, q_perm, k_perm):
    """``np_pooled_query`` in an ordered block space: query block ``a`` holds the queries at
    ``q_perm[b, h, a*bq:(a+1)*bq]``, key block ``j`` the keys at ``k_perm[b, g, j*bk:(j+1)*bk]`` (bidirectional)."""
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    valid = np_valid_keys(key_mask, batch, lk)
    out = np.zeros((batch, hq, -(-lq // bq), -(-lk // bk)))
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, hkv)):
            kh = k[b, :, g].astype(np.float64)
            for a in range(out.shape[2]):
                qmean = q[b, q_perm[b, h, a * bq: (a + 1) * bq], h].astype(np.float64).mean(0)
                p = np_softmax_rows(qmean[None], kh, valid[b], 1 / math.sqrt(d))[0]
                out[b, h, a] = [p[k_perm[b, g, j * bk: (j + 1) * bk]].sum() for j in range(out.shape[3])]
    return out


@pytest.mark.parametrize("name,order", [("gqa_holes", "cluster"), ("mha_pad", "sort"), ("cross_ragged", "cluster"),
                                        ("gqa_holes", "sort_k")])
def test_pooled_query_in_an_ordered_block_space_matches_numpy(name, order):
    """With sort_* or cluster_* the estimate runs over the ordered blocks (the same permutations as the oracle's
    and BA-Att's), and the selection carries them."""
    q, k, key_mask, bq, bk = problem(name)
    switches = dict(sort=dict(sort_q=True, sort_k=True), sort_k=dict(sort_k=True),
                    cluster=dict(cluster_q=True, cluster_k=True, cluster_iters=2))[order]
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="pooled_query", sparsity=0.5, **switches)
    jq, jk, jm = jnp_args(q, k, key_mask)
    log_mass, sel = _pooled_query(jq, jk, jm, config)
    q_perm, k_perm = (None if x is None else np.asarray(x) for x in sort_permutations(jq, jk, config, jm))
    assert (sel.q_perm is None) == (q_perm is None) and sel.k_perm is not None
    if q_perm is not None:
        np.testing.assert_array_equal(np.asarray(sel.q_perm), q_perm)
    np.testing.assert_array_equal(np.asarray(sel.k_perm), k_perm)
    if q_perm is None:
        q_perm = np.broadcast_to(np.arange(q.shape[1]), (q.shape[0], q.shape[2], q.shape[1]))
    want = np_pooled_query_ordered(q, k, key_mask, bq, bk, q_perm, k_perm)
    np.testing.assert_allclose(np.exp(np.asarray(log_mass)), want, atol=2e-6, rtol=1e-4)
    positional = np_pooled_query(q, k, key_mask, bq, bk)
    assert np.abs(want - positional).max() > 1e-3  # the order changes the estimate: a test that can fail
    with np.errstate(divide="ignore"):
        priority = np.log(want)
    assert compare_selection(sel, priority, want, config, q.shape[1], k.shape[1]) > 0


@pytest.mark.parametrize("stride,per_proxy,name,rule", [
    (8, 1, "gqa_holes", "tau"), (16, 2, "mha_pad", "sparsity+local"), (32, 1, "cross_ragged", "peak+sink"),
])
def test_proxy_matches_numpy(stride, per_proxy, name, rule):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, selector="proxy",
                            selector_params=ProxyParams(stride=stride, kv_heads_per_proxy=per_proxy), **RULES[rule])
    scores, sel = _scores_and_selection(proxy, *jnp_args(q, k, key_mask), config)
    want = np_proxy(q, k, key_mask, bq, bk, stride, per_proxy)
    assert_scores_close(scores, want, atol=1e-4)
    assert compare_selection(sel, want, softmax_rows(want), config, q.shape[1], k.shape[1]) > 0


# -- the peak-relative rule and forced blocks, on the budget step itself ----------------------------------------


def _random_scores(seed, shape=(2, 3, 5, 12), empty=2):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=shape) * 2.0
    scores[..., -empty:][rng.uniform(size=shape[:-1] + (empty,)) < 0.5] = -np.inf  # some rows have empty blocks
    return scores.astype(np.float32)


@pytest.mark.parametrize("budget", [
    dict(peak_margin=0.0), dict(peak_margin=1.0), dict(peak_margin=3.0, min_blocks=3),
    dict(peak_margin=4.0, max_blocks=4), dict(sparsity=0.5), dict(tau=0.7), dict(),
])
@pytest.mark.parametrize("forced", [dict(), dict(force_sink=True, sink_positions=(0, 40)),
                                    dict(local_window=1), dict(force_sink=True, local_window=2)])
@pytest.mark.parametrize("with_probs", [False, True])
def test_budget_rules_compose_with_forced_blocks(budget, forced, with_probs):
    """Every rule, with and without sink and local blocks, against NumPy: forced blocks always kept."""
    scores = _random_scores(0)
    config = baatt.BAConfig(block_size=16, **budget, **forced)
    nk = scores.shape[-1]
    forced_np = np_forced(config, 16 * scores.shape[2], 16 * nk)
    forced_jnp = jnp.asarray(forced_np)[None, None]
    rng = np.random.default_rng(1)
    probs = None
    if with_probs:  # a selector's own mass, unrelated to its ranking scores, with zeros
        probs = np.where(np.isfinite(scores), rng.uniform(size=scores.shape) * (rng.uniform(size=scores.shape) > 0.2),
                         0.0).astype(np.float32)
    sel = select_from_scores(jnp.asarray(scores), config, forced=None if not forced_np.any() else forced_jnp,
                             probs=None if probs is None else jnp.asarray(probs))
    mass = softmax_rows(scores.astype(np.float64)) if probs is None else probs.astype(np.float64)
    assert compare_selection(sel, scores.astype(np.float64), mass, config, 16 * scores.shape[2], 16 * nk) > 0
    kept = np.asarray(sel.kept_mask(nk))
    valid = np.isfinite(scores)
    assert np.all(kept[forced_np[None, None] & valid])
    assert not np.any(kept & ~valid)


def test_peak_rule_keeps_blocks_within_the_margin():
    scores = jnp.asarray([[[[0.0, -0.5, -1.2, -3.0, -jnp.inf, -0.9]]]])

    def kept(**rule):
        sel = select_from_scores(scores, baatt.BAConfig(**rule))
        return sorted(np.asarray(sel.indices)[0, 0, 0, : int(sel.counts[0, 0, 0])].tolist())

    assert kept(peak_margin=1.0) == [0, 1, 5]
    assert kept(peak_margin=1.0, max_blocks=2) == [0, 1]
    assert kept(peak_margin=0.1, min_blocks=4) == [0, 1, 2, 5]
    assert kept(peak_margin=50.0) == [0, 1, 2, 3, 5]  # never the block without a valid key
    assert kept(peak_margin=0.0) == [0]


def test_peak_margin_config_rules():
    with pytest.raises(ValueError, match=r"BAConfig\.peak_margin excludes sparsity and tau"):
        baatt.BAConfig(peak_margin=1.0, sparsity=0.5)
    with pytest.raises(ValueError, match=r"BAConfig\.peak_margin excludes sparsity and tau"):
        baatt.BAConfig(peak_margin=1.0, tau=0.9)
    for bad in (-0.1, float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"BAConfig\.peak_margin must be a finite number >= 0"):
            baatt.BAConfig(peak_margin=bad)
    assert baatt.BAConfig(peak_margin=2.0, max_blocks=3).kmax(10) == 3
    assert baatt.BAConfig(peak_margin=2.0).kmax(10) == 10


def test_peak_rule_through_attention_matches_reference():
    q, k, key_mask, bq, bk = problem("gqa_holes")
    v = np.random.default_rng(5).normal(size=k.shape).astype(np.float32)
    config = baatt.BAConfig(block_size=bq, peak_margin=2.0, force_sink=True, selector="query_token")
    args = jnp_args(q, k, key_mask)
    out, stats = baatt.attention(args[0], args[1], jnp.asarray(v), config=config, key_mask=args[2],
                                 return_stats=True)
    sel = stats["selection"]
    want, _ = bf.block_sparse(q, k, v, np.asarray(sel.indices), np.asarray(sel.counts), bq, bq, mask=key_mask)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)
    assert np.mean(np.asarray(sel.counts)) < -(-q.shape[1] // bq)  # the rule dropped blocks


# -- parameters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,message", [
    (lambda: QueryTokenParams(aggregate="median"), r"QueryTokenParams\.aggregate must be one of"),
    (lambda: QueryTokenParams(variance_weight=-1.0), r"QueryTokenParams\.variance_weight must be a finite number"),
    (lambda: QuestParams(aggregate="sum"), r"QuestParams\.aggregate must be one of"),
    (lambda: MixedParams(probes=0), r"MixedParams\.probes must be an int >= 1"),
    (lambda: MixedParams(group=2.0), r"MixedParams\.group must be an int >= 1"),
    (lambda: MixedParams(blend=1.5), r"MixedParams\.blend must be None or a number in \[0, 1\]"),
    (lambda: ProxyParams(stride=0), r"ProxyParams\.stride must be an int >= 1"),
    (lambda: ProxyParams(kv_heads_per_proxy=True), r"ProxyParams\.kv_heads_per_proxy must be an int >= 1"),
])
def test_param_rules(params, message):
    with pytest.raises(ValueError, match=message):
        params()


def test_shape_rules_name_the_parameter():
    q = jnp.zeros((1, 64, 2, 16))
    k = jnp.zeros((1, 64, 2, 16))
    cases = [
        (baatt.BAConfig(block_size=16, block_size_k=8, selector="mixed"), r"block_k \(8\) to be a multiple of "
         r"MixedParams\.group \(16\)"),
        (baatt.BAConfig(block_size=16, selector="mixed", selector_params=MixedParams(probes=17, group=8)),
         r"MixedParams\.probes \(17\) <= block_q \(16\)"),
        (baatt.BAConfig(block_size=8, selector="proxy"), r"block_q \(8\) to be a multiple of ProxyParams\.stride"),
        (baatt.BAConfig(block_size=16, selector="proxy", selector_params=ProxyParams(kv_heads_per_proxy=3)),
         r"kv_heads_per_proxy \(3\) to divide the kv heads \(2\)"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            select_blocks(q, k, config)


# -- causal and block-causal masks ---------------------------------------------------------------------------

MASKED = [
    ("gqa_holes", baatt.AttentionMask.causal()),
    ("cross_ragged", baatt.AttentionMask.causal()),  # Lq != Lk: aligned at the top left
    ("mha_pad", baatt.AttentionMask.block_causal(64)),
]


def _masked(name, mask, selector, params=None):
    q, k, key_mask, bq, bk = problem(name)
    config = baatt.BAConfig(block_size=bq, block_size_k=bk, sparsity=0.5, selector=selector,
                            selector_params=params, mask=mask)
    return q, k, key_mask, bq, bk, config, mask.token_mask(q.shape[1], k.shape[1])


def check_masked_selection(sel, config, q, k):
    """Every kept pair is one the mask allows; the selection records its mask."""
    allowed, _ = config.mask.block_pairs(q.shape[1], k.shape[1], config.block_q, config.block_k)
    kept = np.asarray(sel.kept_mask(allowed.shape[-1]))
    assert not np.any(kept & ~allowed) and sel.mask == config.mask


@pytest.mark.parametrize("name,mask", MASKED)
def test_query_mass_under_mask_matches_numpy(name, mask):
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, "meanpool")
    jq, jk, jm = jnp_args(q, k, key_mask)
    sel = select_blocks(jq, jk, config, key_mask=jm)
    got = np.asarray(error.query_mass(jq, jk, sel, key_mask=jm))
    batch, lq, hq, d = q.shape
    valid = np_valid_keys(key_mask, batch, k.shape[1])
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    kb = np_blocks(k.shape[1], bk)
    for b in range(batch):
        for h, g in enumerate(bf.heads_of(hq, k.shape[2])):
            a_full = np_softmax_rows(q[b, :, h].astype(np.float64), k[b, :, g].astype(np.float64), valid[b],
                                     1 / math.sqrt(d), visible)
            for a, qi in enumerate(np_blocks(lq, bq)):
                keys = [j for c in idx[b, h, a, : cnt[b, h, a]] for j in kb[c]]
                np.testing.assert_allclose(got[b, h, qi], a_full[np.ix_(qi, keys)].sum(1), atol=2e-6)


@pytest.mark.parametrize("name,mask", MASKED)
def test_max_oracle_under_mask(name, mask):
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, "max_oracle")
    scores, sel = _scores_and_selection(max_oracle, *jnp_args(q, k, key_mask), config)
    want = np_max_oracle(q, k, key_mask, bq, bk, visible)
    np.testing.assert_allclose(np.exp(np.asarray(scores)), want, atol=2e-6, rtol=1e-4)
    check_masked_selection(sel, config, q, k)


@pytest.mark.parametrize("name,mask", MASKED)
@pytest.mark.parametrize("selector", ["query_token", "quest"])
def test_token_estimators_under_mask(name, mask, selector):
    """On the block a token's limit cuts, the score uses only the keys the token may see."""
    aggregate = "logsumexp" if selector == "quest" else "mean"
    params = QuestParams(aggregate) if selector == "quest" else QueryTokenParams(aggregate, variance_weight=0.5)
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, selector, params)
    module = quest if selector == "quest" else query_token
    scores, sel = _scores_and_selection(module, *jnp_args(q, k, key_mask), config)
    if selector == "quest":
        want = np_quest(q, k, key_mask, bq, bk, aggregate, visible)
    else:
        want = np_query_token(q, k, key_mask, bq, bk, aggregate, 0.5, visible)
    assert_scores_close(scores, want)
    check_masked_selection(sel, config, q, k)


@pytest.mark.parametrize("name,mask", MASKED)
def test_mixed_under_mask(name, mask):
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, "mixed", MixedParams(probes=2, group=8))
    (scores, mass), sel = _scores_and_selection(mixed, *jnp_args(q, k, key_mask), config)
    probe, pooled = np_mixed(q, k, key_mask, bq, bk, 2, 8, visible)
    np.testing.assert_allclose(np.asarray(mass), 0.5 * probe + 0.5 * pooled, atol=2e-6, rtol=1e-4)
    check_masked_selection(sel, config, q, k)


@pytest.mark.parametrize("name,mask", MASKED)
def test_proxy_under_mask(name, mask):
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, "proxy", ProxyParams(stride=8))
    scores, sel = _scores_and_selection(proxy, *jnp_args(q, k, key_mask), config)
    assert_scores_close(scores, np_proxy(q, k, key_mask, bq, bk, 8, 1, visible), atol=1e-4)
    check_masked_selection(sel, config, q, k)


@pytest.mark.parametrize("name,mask", MASKED)
def test_pooled_query_under_mask(name, mask):
    q, k, key_mask, bq, bk, config, visible = _masked(name, mask, "pooled_query")
    log_mass, sel = _pooled_query(*jnp_args(q, k, key_mask), config)
    np.testing.assert_allclose(np.exp(np.asarray(log_mass)), np_pooled_query(q, k, key_mask, bq, bk, visible),
                               atol=2e-6, rtol=1e-4)
    check_masked_selection(sel, config, q, k)
