"""The peer selectors (docs/spec.md section 9): xattention, last_query, sparge_like.

Each is checked against a brute-force float64 NumPy version written here from
the papers' descriptions (loops, small sizes), on fresh random inputs drawn by
hypothesis: the per-block scores / mass, and the exact set of kept blocks
under the shared budget rules. Rows whose selection is decided by a near-tie
(a score gap or a cumulative mass within float32 noise of the cut) are not
compared exactly; continuous random inputs make those rare.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from baatt.config import BAConfig
from baatt.selection import last_query, sparge_like, xattention

SETTINGS = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# -- inputs -----------------------------------------------------------------------


def make_inputs(seed, batch, lq, lk, hq, hkv, d, block, *, pad=True, holes=False, structure=2.5):
    """q, k float32 with block structure (random per-block offset of random strength), key_mask or None."""
    rng = np.random.default_rng(seed)

    def tokens(length, heads):
        nb = -(-length // block)
        offset = rng.normal(size=(batch, nb, heads, d))
        strength = rng.uniform(0.0, structure, size=(batch, nb, heads, 1))
        x = rng.normal(size=(batch, nb * block, heads, d)) + np.repeat(offset * strength, block, axis=1)
        return x[:, :length].astype(np.float32)

    q, k = tokens(lq, hq), tokens(lk, hkv)
    mask = None
    if pad:
        lengths = rng.integers(1, lk + 1, size=batch)
        lengths[0] = max(lengths[0], lk // 2)  # keep one row mostly real
        mask = np.arange(lk)[None, :] < lengths[:, None]
        if holes:
            mask &= rng.uniform(size=mask.shape) > 0.15
            mask[:, 0] = True
    return q, k, mask


@st.composite
def problems(draw, *, same_length=False):
    batch = draw(st.integers(1, 2))
    lq = draw(st.integers(64, 300))
    lk = lq if same_length else draw(st.integers(64, 300))
    bq = draw(st.sampled_from([16, 32]))
    bk = draw(st.sampled_from([16, 32]))
    d = draw(st.sampled_from([16, 32]))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    pad = draw(st.booleans())
    holes = pad and draw(st.booleans())
    budget = draw(
        st.one_of(
            st.builds(lambda s: dict(sparsity=s), st.sampled_from([0.3, 0.5, 0.75])),
            st.builds(
                lambda t, m: dict(tau=t, max_blocks=m),
                st.sampled_from([0.5, 0.8, 0.95]),
                st.sampled_from([None, None, 3]),
            ),
        )
    )
    forced = draw(st.sampled_from([{}, {}, dict(force_sink=True), dict(local_window=1)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(batch=batch, lq=lq, lk=lk, bq=bq, bk=bk, d=d, hq=hq, hkv=hkv, pad=pad, holes=holes,
                budget=budget, forced=forced, seed=seed)


def setup(p, **extra):
    q, k, mask = make_inputs(p["seed"], p["batch"], p["lq"], p["lk"], p["hq"], p["hkv"], p["d"],
                             min(p["bq"], p["bk"]), pad=p["pad"], holes=p["holes"])
    config = BAConfig(block_size=p["bq"], block_size_k=p["bk"], **p["budget"], **p["forced"], **extra)
    return q, k, mask, config


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jitted(module, q, k, mask, config):
    out = module.block_scores(q, k, config, key_mask=mask)
    if module is last_query:
        out = out + last_query.line_masses(q, k, config, key_mask=mask)
    return out, module.select(q, k, config, key_mask=mask)


def run(module, q, k, mask, config):
    """Jitted block_scores (plus line_masses for last_query) and select of a selector module (one compile)."""
    jmask = None if mask is None else jnp.asarray(mask)
    out, sel = _jitted(module, jnp.asarray(q), jnp.asarray(k), jmask, config)
    return jax.tree.map(np.asarray, out), sel


# -- NumPy references ----------------------------------------------------------------


def np_key_valid(mask, batch, lk, nk, bk):
    """bool [B, Nk*bk] key validity (padding False) and bool [B, Nk] non-empty key blocks."""
    valid = np.zeros((batch, nk * bk), bool)
    valid[:, :lk] = True if mask is None else mask
    return valid, valid.reshape(batch, nk, bk).any(-1)


def np_kmax(config, nk):
    if config.sparsity is not None:
        kappa = math.ceil(round((1 - config.sparsity) * nk, 9))
    elif config.tau is not None:
        kappa = nk if config.max_blocks is None else config.max_blocks
    else:
        kappa = nk
    n_forced = (len(set(config.sink_positions)) if config.force_sink else 0) + (
        2 * config.local_window + 1 if config.local_window else 0
    )
    return max(1, min(max(kappa, n_forced), nk))


def np_forced(config, lq, lk):
    """bool [Nq, Nk]: the config's always-kept blocks (sink, local band)."""
    nq, nk = -(-lq // config.block_q), -(-lk // config.block_k)
    forced = np.zeros((nq, nk), bool)
    if config.force_sink:
        for p in config.sink_positions:
            if p < lk:
                forced[:, p // config.block_k] = True
    if config.local_window:
        for a in range(nq):
            centre = min(a * config.block_q + config.block_q // 2, lk - 1) // config.block_k
            for b in range(nk):
                forced[a, b] |= abs(b - centre) <= config.local_window
    return forced


def np_budget(order_key, mass, valid, forced, config):
    """Kept block set of one row, and whether it is fragile (decided by a near-tie).

    order_key: list of sortable keys per block (larger = earlier); mass: per-block
    mass (tau); valid: bool per block; forced: bool per block.
    """
    nk = len(valid)
    kmax = np_kmax(config, nk)
    blocks = [b for b in range(nk) if valid[b]]
    order = sorted(blocks, key=lambda b: (not forced[b],) + tuple(-x for x in order_key[b]))
    n_forced = sum(bool(forced[b]) for b in blocks)
    fragile = False
    if config.tau is not None:
        m = np.array([mass[b] for b in order], np.float64)
        total = np.sum([mass[b] for b in blocks])
        m = m / total if total > 0 else np.zeros_like(m)
        cum = np.cumsum(m)[:kmax]
        reach = np.nonzero(cum >= config.tau - 1e-6)[0]
        count = int(reach[0]) + 1 if reach.size else kmax + 1
        count = min(max(count, config.min_blocks), kmax)
        fragile |= bool(np.any(np.abs(cum - config.tau) < 2e-5))
    else:
        count = kmax
    count = max(count, n_forced)
    count = max(min(count, len(blocks)), 1)
    if count < len(order):
        last, nxt = order[count - 1], order[count]
        if bool(forced[last]) == bool(forced[nxt]):
            gap = [abs(x - y) for x, y in zip(order_key[last], order_key[nxt])]
            first = next((g for g in gap if g > 0), 0.0)
            fragile |= first < 1e-4
    return set(order[:count]), fragile


def compare_selection(sel, keys, mass, valid, forced_cfg, config, *, max_fragile=0.25):
    """Exact kept sets vs the NumPy budget on every non-fragile row; returns #rows compared."""
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    batch, heads, nq, nk = mass.shape
    assert idx.shape == (batch, heads, nq, np_kmax(config, nk))
    compared = fragile_rows = 0
    for b in range(batch):
        for h in range(heads):
            for a in range(nq):
                want, fragile = np_budget(keys(b, h, a), mass[b, h, a], valid[b], forced_cfg[a] & valid[b], config)
                got = set(idx[b, h, a, : cnt[b, h, a]].tolist())
                assert len(got) == cnt[b, h, a], "kept ids must be distinct"
                if fragile:
                    fragile_rows += 1
                    continue
                compared += 1
                assert got == want, (b, h, a, sorted(got), sorted(want))
    assert fragile_rows <= max_fragile * batch * heads * nq + 1
    return compared


def np_xattention(q, k, mask, config):
    """Block mass [B, Hq, Nq, Nk] of XAttention, float64, from explicit antidiagonal sums."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    s, bq, bk = config.xattn_stride, config.block_q, config.block_k
    nq, nk = -(-lq // bq), -(-lk // bk)
    kvalid, _ = np_key_valid(mask, batch, lk, nk, bk)
    qpad = np.zeros((batch, nq * bq, hq, d))
    qpad[:, :lq] = q
    kpad = np.zeros((batch, nk * bk, hkv, d))
    kpad[:, :lk] = k
    kpad[~kvalid] = 0.0
    rows, cols = nq * bq // s, nk * bk // s
    row_ok = np.array([any(i * s + t < lq for t in range(s)) for i in range(rows)])
    out = np.zeros((batch, hq, nq, nk))
    for b in range(batch):
        col_ok = kvalid[b].reshape(cols, s).any(-1)
        for h in range(hq):
            g = h // (hq // hkv)
            logit = np.zeros((rows, cols))
            for t in range(s):  # logit[i, j] = sum_t q[i*s + s-1-t] . k[j*s + t]
                logit += qpad[b, s - 1 - t :: s, h] @ kpad[b, t::s, g].T
            logit /= math.sqrt(d) * s
            logit[:, ~col_ok] = -np.inf
            p = np.exp(logit - logit.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            for a in range(nq):
                for c in range(nk):
                    r = [i for i in range(a * bq // s, (a + 1) * bq // s) if row_ok[i]]
                    out[b, h, a, c] = p[np.ix_(r, range(c * bk // s, (c + 1) * bk // s))].sum()
            out[b, h] /= out[b, h].sum(-1, keepdims=True)
    return out


def np_last_query(q, k, mask, config, positions=None):
    """(vertical, slash, block mass, scores) of the last-query vertical-slash selector, float64; with
    ``positions`` [B, m], those queries (the real ones among them) instead of the last ones."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq, bk = config.block_q, config.block_k
    nq, nk = -(-lq // bq), -(-lk // bk)
    _, block_ok = np_key_valid(mask, batch, lk, nk, bk)
    kmask = np.ones((batch, lk), bool) if mask is None else mask
    n = min(config.last_query_size, lq)
    # Offsets o = j - i that some (query of block a, key of block c) pair realises.
    hits = {}
    for a in range(nq):
        qi = np.arange(a * bq, min((a + 1) * bq, lq))
        for c in range(nk):
            kj = np.arange(c * bk, min((c + 1) * bk, lk))
            hits[a, c] = np.unique(np.subtract.outer(kj, qi))
    vert = np.zeros((batch, hq, lk))
    slash = np.zeros((batch, hq, lq + lk - 1))
    mass = np.zeros((batch, hq, nq, nk))
    for b in range(batch):
        real = kmask[b] if (mask is not None and lq == lk) else np.ones(lq, bool)
        pos = [i for i in range(lq - 1, -1, -1) if real[i]][:n] if positions is None else [
            int(i) for i in positions[b] if real[i]]
        for h in range(hq):
            g = h // (hq // hkv)
            for i in pos:
                logit = k[b, :, g] @ q[b, i, h] / math.sqrt(d)
                logit[~kmask[b]] = -np.inf
                p = np.exp(logit - logit.max())
                p /= p.sum()
                vert[b, h] += p / len(pos)
                slash[b, h, lq - 1 - i : lq - 1 - i + lk] += p / len(pos)  # offset j - i, j = 0..lk-1
            kept = []
            for line in (vert[b, h], slash[b, h]):
                desc = np.sort(line)[::-1]
                cum = np.cumsum(desc)
                c = int(np.nonzero(cum >= config.last_query_gamma * cum[-1])[0][0]) + 1
                kept.append(np.where(line >= desc[c - 1], line, 0.0))
            for a in range(nq):
                for c in range(nk):
                    mass[b, h, a, c] = kept[0][c * bk : (c + 1) * bk].sum() + kept[1][hits[a, c] + lq - 1].sum()
    mass[~np.broadcast_to(block_ok[:, None, None, :], mass.shape)] = 0.0
    cq = (np.arange(nq) + 0.5) * bq
    ck = (np.arange(nk) + 0.5) * bk
    tiebreak = -np.abs(ck[None, :] - cq[:, None]) / bk - 0.25 * np.arange(nk)[None, :] / nk
    with np.errstate(divide="ignore"):
        scores = np.where(mass > 0, np.log(mass), last_query.ZERO_MASS_SCORE + tiebreak)
    scores[~np.broadcast_to(block_ok[:, None, None, :], mass.shape)] = -np.inf
    return vert, slash, mass, scores


def np_sparge(q, k, mask, config):
    """(logits, q_similar, k_similar, similarities) of the SpargeAttn-like selector, float64."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    batch, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq, bk = config.block_q, config.block_k
    nq, nk = -(-lq // bq), -(-lk // bk)
    kmask = np.ones((batch, lk), bool) if mask is None else mask

    def stats(tokens):
        if len(tokens) == 0:
            return None, 1.0
        unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        return tokens.mean(0), float(np.mean(unit @ unit.T))

    logits = np.full((batch, hq, nq, nk), -np.inf)
    qsim = np.zeros((batch, hq, nq))
    ksim = np.zeros((batch, hq, nk))
    for b in range(batch):
        for h in range(hq):
            g = h // (hq // hkv)
            qs = [stats(q[b, a * bq : min((a + 1) * bq, lq), h]) for a in range(nq)]
            ks = [
                stats(k[b, c * bk : min((c + 1) * bk, lk), g][kmask[b, c * bk : min((c + 1) * bk, lk)]])
                for c in range(nk)
            ]
            qsim[b, h] = [s for _, s in qs]
            ksim[b, h] = [s for _, s in ks]
            for a in range(nq):
                for c in range(nk):
                    if ks[c][0] is not None:
                        logits[b, h, a, c] = qs[a][0] @ ks[c][0] / math.sqrt(d)
    thr = config.sparge_sim_threshold
    return logits, qsim > thr, ksim > thr, qsim, ksim


# -- XAttention -------------------------------------------------------------------------


@SETTINGS
@given(p=problems(), stride=st.sampled_from([4, 8]))
def test_xattention_matches_numpy(p, stride):
    q, k, mask, config = setup(p, selector="xattention", xattn_stride=stride)
    (scores, mass), sel = run(xattention, q, k, mask, config)
    want = np_xattention(q, k, mask, config)
    np.testing.assert_allclose(mass, want, atol=2e-6, rtol=1e-4)
    finite = want > 1e-6
    np.testing.assert_allclose(scores[finite], np.log(want[finite]), atol=1e-4, rtol=0)
    nq, nk = want.shape[2:]
    _, block_ok = np_key_valid(mask, q.shape[0], k.shape[1], nk, config.block_k)
    assert np.all(np.isneginf(scores) == ~block_ok[:, None, None, :])
    forced = np_forced(config, q.shape[1], k.shape[1])
    with np.errstate(divide="ignore"):
        logw = np.log(want)
    compared = compare_selection(sel, lambda b, h, a: [(x,) for x in logw[b, h, a]], want, block_ok, forced, config)
    assert compared > 0
    check_budget_properties(sel, mass, block_ok, config, q, k)


def test_xattention_needs_stride_dividing_block_k():
    q = jnp.zeros((1, 64, 1, 16))
    config = BAConfig(block_size=32, block_size_k=8, xattn_stride=16, sparsity=0.5)
    with pytest.raises(ValueError, match="xattn_stride"):
        xattention.select(q, q, config)


def test_xattention_antidiagonal_layout():
    """One strided logit is exactly the mean of an S-long antidiagonal of the full logit map."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 64, 1, 16)).astype(np.float32)
    k = rng.normal(size=(1, 64, 1, 16)).astype(np.float32)
    config = BAConfig(block_size=32, xattn_stride=8)
    from baatt.selection.common import positional_space

    qs, _, ks, _ = xattention.strided_rows(positional_space(jnp.asarray(q), jnp.asarray(k), config), 8)
    full = q[0, :, 0].astype(np.float64) @ k[0, :, 0].astype(np.float64).T
    for i, j in [(0, 0), (3, 5), (7, 1)]:
        anti = sum(full[i * 8 + 7 - t, j * 8 + t] for t in range(8))
        assert np.isclose(float(qs[0, 0, i] @ ks[0, 0, j]), anti, rtol=1e-5, atol=1e-4)


# -- last query (vertical-slash) -----------------------------------------------------------


def check_last_query(q, k, mask, config, got, want):
    """last_query's jitted (scores, mass, vertical, slash) and selection ``got`` against NumPy's ``want``
    (vertical, slash, mass, scores); draws near the gamma cut of a line set are skipped."""
    (scores, mass, jv, js), sel = got
    vert, slash, want_mass, want_scores = want
    for lines in (vert, slash):  # the kept line sets are decided by a cut in cumulative mass
        desc = -np.sort(-lines, axis=-1)
        cum = np.cumsum(desc, axis=-1)
        assume(not np.any(np.abs(cum - config.last_query_gamma * cum[..., -1:]) < 1e-5))
    np.testing.assert_allclose(jv, vert, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(js, slash, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(mass, want_mass, atol=2e-6, rtol=1e-4)
    assert np.all((mass > 0) == (want_mass > 0))
    np.testing.assert_allclose(scores, want_scores, atol=1e-3, rtol=0)  # -inf positions must match too
    _, block_ok = np_key_valid(mask, q.shape[0], k.shape[1], want_mass.shape[-1], config.block_k)
    forced = np_forced(config, q.shape[1], k.shape[1])
    compared = compare_selection(
        sel, lambda b, h, a: [(x,) for x in want_scores[b, h, a]], want_mass, block_ok, forced, config
    )
    assert compared > 0
    check_budget_properties(sel, mass, block_ok, config, q, k)


@SETTINGS
@given(
    p=problems(same_length=False) | problems(same_length=True),
    nlast=st.sampled_from([16, 64, 400]),
    gamma=st.sampled_from([0.5, 0.9]),
)
def test_last_query_matches_numpy(p, nlast, gamma):
    q, k, mask, config = setup(p, selector="last_query", last_query_size=nlast, last_query_gamma=gamma)
    check_last_query(q, k, mask, config, run(last_query, q, k, mask, config), np_last_query(q, k, mask, config))


def test_last_query_uses_last_real_queries():
    """With key_mask and Lq == Lk, masked tail positions are not 'last queries'."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 96, 1, 16)).astype(np.float32)
    k = rng.normal(size=(1, 96, 1, 16)).astype(np.float32)
    mask = np.arange(96)[None] < 50
    config = BAConfig(block_size=16, last_query_size=8, sparsity=0.5)
    pos, ok = last_query.last_queries(96, 96, 8, jnp.asarray(mask))
    assert np.asarray(pos).tolist() == [list(range(49, 41, -1))] and bool(np.all(ok))
    q2 = q.copy()
    q2[0, 50:] = rng.normal(size=(46, 1, 16))  # changing padding queries changes nothing
    a = last_query.line_masses(jnp.asarray(q), jnp.asarray(k), config, key_mask=jnp.asarray(mask))
    b = last_query.line_masses(jnp.asarray(q2), jnp.asarray(k), config, key_mask=jnp.asarray(mask))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.partial(jax.jit, static_argnums=(3,))
def _jitted_given(q, k, mask, config, positions):
    out = last_query.block_scores(q, k, config, key_mask=mask, query_positions=positions)
    out = out + last_query.line_masses(q, k, config, key_mask=mask, query_positions=positions)
    return out, last_query.select(q, k, config, key_mask=mask, query_positions=positions)


@SETTINGS
@given(p=problems(same_length=False) | problems(same_length=True), m=st.sampled_from([1, 5, 40]),
       gamma=st.sampled_from([0.5, 0.9]), data=st.data())
def test_last_query_from_given_positions_matches_numpy(p, m, gamma, data):
    """query_positions [B, m] (repeats allowed, any order): the lines come from exactly those queries."""
    q, k, mask, config = setup(p, selector="last_query", last_query_gamma=gamma)
    lq = q.shape[1]
    positions = np.asarray(data.draw(st.lists(st.lists(st.integers(0, lq - 1), min_size=m, max_size=m),
                                              min_size=q.shape[0], max_size=q.shape[0])), np.int32)
    real = np.ones((q.shape[0], lq), bool) if (mask is None or lq != k.shape[1]) else mask
    assume(all(real[b, positions[b]].any() for b in range(q.shape[0])))  # a row without a real one scores nothing
    jmask = None if mask is None else jnp.asarray(mask)
    out, sel = _jitted_given(jnp.asarray(q), jnp.asarray(k), jmask, config, jnp.asarray(positions))
    check_last_query(q, k, mask, config, (jax.tree.map(np.asarray, out), sel),
                     np_last_query(q, k, mask, config, positions))


def test_last_query_given_the_last_positions_is_the_default():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 96, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 96, 1, 16)), jnp.float32)
    config = BAConfig(block_size=16, last_query_size=24, sparsity=0.5, selector="last_query")
    default = last_query.select(q, k, config)
    given_last = last_query.select(q, k, config, query_positions=jnp.arange(72, 96)[None])
    np.testing.assert_array_equal(np.asarray(default.indices), np.asarray(given_last.indices))
    front = last_query.select(q, k, config, query_positions=jnp.arange(0, 24)[None])
    assert not np.array_equal(np.asarray(default.indices), np.asarray(front.indices))


# -- SpargeAttn-like ---------------------------------------------------------------------------


@SETTINGS
@given(p=problems(), threshold=st.sampled_from([0.3, 0.5]))
def test_sparge_like_matches_numpy(p, threshold):
    q, k, mask, config = setup(p, selector="sparge_like", sparge_sim_threshold=threshold)
    logits, qsim, ksim, qs_val, ks_val = np_sparge(q, k, mask, config)
    assume(not np.any(np.abs(qs_val - threshold) < 1e-4) and not np.any(np.abs(ks_val - threshold) < 1e-4))
    (scores, probs, jlogits, jq, jk), sel = run(sparge_like, q, k, mask, config)
    np.testing.assert_array_equal(jq, qsim)
    np.testing.assert_array_equal(jk, ksim)
    np.testing.assert_allclose(jlogits, logits, atol=1e-5, rtol=1e-5)
    nk = logits.shape[-1]
    _, block_ok = np_key_valid(mask, q.shape[0], k.shape[1], nk, config.block_k)
    ranked = block_ok[:, None, None, :] & ksim[:, :, None, :]
    # Mass under tau: softmax over the ranked blocks, zero for forced K blocks and for Q blocks that attend everywhere.
    # The config's forced blocks (sink, local) carry no mass either: they are added on top.
    forced = np_forced(config, q.shape[1], k.shape[1])
    ranked = ranked & ~forced[None, None]
    e = np.where(ranked, np.exp(np.where(ranked, logits, 0.0)), 0.0)
    want_probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300) * qsim[..., None]
    np.testing.assert_allclose(probs, want_probs, atol=1e-6, rtol=1e-4)

    def keys(b, h, a):  # forced K blocks (not similar) first, then by pooled logit
        return [(float(not ksim[b, h, c]), logits[b, h, a, c]) for c in range(nk)]

    compared = compare_selection(sel, keys, want_probs, block_ok, forced, config)
    assert compared > 0
    check_budget_properties(sel, probs, block_ok, config, q, k)
    # Forced K blocks are all kept whenever the budget width allows it.
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    kmax = sel.kmax
    for b, h, a in np.ndindex(*cnt.shape):
        kept = set(idx[b, h, a, : cnt[b, h, a]].tolist())
        must = {c for c in range(nk) if block_ok[b, c] and not ksim[b, h, c]}
        if len(must) + int(forced[a][block_ok[b]].sum()) <= kmax:
            assert must <= kept


def _dissimilar_block_inputs():
    """Structured q/k (similar blocks) with Q block 1 and K block 2 made of pure noise (dissimilar)."""
    rng = np.random.default_rng(3)
    block, nb, d = 16, 8, 16
    q = np.repeat(rng.normal(size=(1, nb, 1, d)) * 3.0, block, axis=1) + 0.3 * rng.normal(size=(1, nb * block, 1, d))
    k = np.repeat(rng.normal(size=(1, nb, 1, d)) * 3.0, block, axis=1) + 0.3 * rng.normal(size=(1, nb * block, 1, d))
    q[0, block : 2 * block] = rng.normal(size=(block, 1, d))
    k[0, 2 * block : 3 * block] = rng.normal(size=(block, 1, d))
    return q.astype(np.float32), k.astype(np.float32)


def test_sparge_like_dissimilar_blocks():
    q, k = _dissimilar_block_inputs()
    mask = np.ones((1, k.shape[1]), bool)
    mask[0, -16:] = False  # last key block is padding only
    jm = jnp.asarray(mask)
    nk_valid = 7
    base = BAConfig(block_size=16, sparge_sim_threshold=0.5)
    _, _, _, qsim, ksim = sparge_like.block_scores(jnp.asarray(q), jnp.asarray(k), base.replace(tau=0.9), key_mask=jm)
    assert np.asarray(qsim)[0, 0].tolist() == [True, False] + [True] * 6
    assert np.asarray(ksim)[0, 0].tolist() == [True, True, False] + [True] * 5

    # tau without max_blocks: the dissimilar Q block attends to every valid key block.
    sel = sparge_like.select(jnp.asarray(q), jnp.asarray(k), base.replace(tau=0.9), key_mask=jm)
    counts, idx = np.asarray(sel.counts)[0, 0], np.asarray(sel.indices)[0, 0]
    assert counts[1] == nk_valid and idx[1, :nk_valid].tolist() == list(range(nk_valid))
    for a in range(8):  # the dissimilar K block is computed by every query block; padding never
        kept = idx[a, : counts[a]].tolist()
        assert 2 in kept and 7 not in kept
    assert np.all(counts[[0] + list(range(2, 8))] < nk_valid)

    # Budget width below "everywhere": that row keeps kmax blocks, the forced K block first, then by logit.
    for cfg in (base.replace(tau=0.9, max_blocks=3), base.replace(sparsity=0.7)):
        scores, _, logits, _, _ = sparge_like.block_scores(jnp.asarray(q), jnp.asarray(k), cfg, key_mask=jm)
        sel = sparge_like.select(jnp.asarray(q), jnp.asarray(k), cfg, key_mask=jm)
        kmax = cfg.kmax(8)
        assert sel.kmax == kmax == 3
        assert int(sel.counts[0, 0, 1]) == kmax
        row = np.asarray(logits)[0, 0, 1]
        by_logit = [c for c in np.argsort(-row) if c != 2 and c != 7][: kmax - 1]
        assert set(np.asarray(sel.indices)[0, 0, 1].tolist()) == {2, *by_logit}


# -- properties shared by the three selectors ------------------------------------------------

SELECTORS = {"xattention": xattention, "last_query": last_query, "sparge_like": sparge_like}


def check_budget_properties(sel, mass, block_ok, config, q, k):
    """Shape and budget rules of any selection; ``mass`` [B, Hq, Nq, Nk] is the selector's own mass."""
    batch, heads, nq, nk = mass.shape
    kmax = np_kmax(config, nk)
    idx, cnt = np.asarray(sel.indices), np.asarray(sel.counts)
    sel.validate(batch=batch, q_heads=q.shape[2], kv_heads=k.shape[2], length_q=q.shape[1], length_k=k.shape[1])
    assert idx.shape == (batch, heads, nq, kmax) and cnt.shape == (batch, heads, nq)
    assert sel.q_perm is None and sel.k_perm is None
    kept = np.asarray(sel.kept_mask(nk))
    # Padding-only key blocks are never kept; kept ids ascend; the tail repeats the last id.
    assert not np.any(kept & ~block_ok[:, None, None, :])
    for b, h, a in np.ndindex(batch, heads, nq):
        c, row = cnt[b, h, a], idx[b, h, a]
        assert np.all(np.diff(row[:c]) > 0) and np.all(row[c:] == row[c - 1])
    n_valid = np.broadcast_to(block_ok.sum(-1)[:, None, None], cnt.shape)
    if config.sparsity is not None:
        assert np.all(cnt == np.minimum(kmax, n_valid))  # full rows keep exactly kmax
        return
    if config.force_sink or config.local_window:
        return
    # tau: the fewest blocks whose (normalised) mass reaches tau, or the most mass kmax blocks can hold.
    m = mass / np.maximum(mass.sum(-1, keepdims=True), 1e-30)
    for b, h, a in np.ndindex(batch, heads, nq):
        c, row, full = cnt[b, h, a], m[b, h, a], min(kmax, n_valid[b, h, a])
        if row.sum() == 0:  # sparge_like: a Q block that attends everywhere
            assert c == full
            continue
        got = row[kept[b, h, a]]
        zeros = int((got == 0).sum())  # sparge_like's forced K blocks carry no mass
        if c < full:
            assert got.sum() >= config.tau - 1e-4
            if c > config.min_blocks:
                # minimal: without its smallest (positive) kept block the row falls short of tau
                assert got.sum() - got[got > 0].min() < config.tau + 1e-4
        else:
            assert got.sum() >= np.sort(row)[::-1][: c - zeros].sum() - 1e-4


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_jit_matches_eager(name):
    q, k, mask = make_inputs(7, 2, 100, 90, 2, 1, 16, 16, pad=True, holes=True)
    config = BAConfig(block_size=16, block_size_k=32, tau=0.8, force_sink=True, xattn_stride=8)
    args = (jnp.asarray(q), jnp.asarray(k))
    eager = SELECTORS[name].select(*args, config, key_mask=jnp.asarray(mask))
    jitted = jax.jit(SELECTORS[name].select, static_argnums=2)(*args, config, key_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(eager.indices), np.asarray(jitted.indices))
    np.testing.assert_array_equal(np.asarray(eager.counts), np.asarray(jitted.counts))
    assert jitted.block_q == 16 and jitted.block_k == 32


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_dispatcher_reaches_selector(name):
    from baatt.selection import select_blocks

    q, k, _ = make_inputs(5, 1, 100, 100, 1, 1, 16, 16, pad=False)
    config = BAConfig(block_size=16, sparsity=0.5, selector=name, xattn_stride=4)
    sel = select_blocks(jnp.asarray(q), jnp.asarray(k), config)
    _, direct = run(SELECTORS[name], q, k, None, config)
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(direct.indices))
    assert np.all(np.asarray(sel.counts) == config.kmax(7))
