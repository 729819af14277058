"""Independent float64 NumPy implementations of the specification, written loop-first for clarity.

They share nothing with the package: every formula is re-derived from docs/spec.md.

``span`` is a causal mask written as a rule on positions: None is bidirectional;
otherwise query ``i`` sees key ``t`` when ``t // span <= i // span`` (1: causal,
G: block causal with generation blocks of G tokens).
"""

from __future__ import annotations

import math

import numpy as np


def heads_of(hq, hkv):
    return [h // (hq // hkv) for h in range(hq)]


def sees(i, t, span):
    """Whether query position i may see key position t."""
    return span is None or t // span <= i // span


def _softmax_rows(s):
    """(p, lse) of each row of s; a row without any finite entry gets p = 0 and lse = -inf."""
    p = np.zeros_like(s)
    lse = np.full(s.shape[0], -np.inf)
    for i, row in enumerate(s):
        if np.isfinite(row).any():
            m = row[np.isfinite(row)].max()
            e = np.exp(row - m)
            lse[i] = m + np.log(e.sum())
            p[i] = e / e.sum()
    return p, lse


def dense(q, k, v, mask=None, span=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, lq, hq, v.shape[-1]))
    lse = np.zeros((b, hq, lq))
    for bi in range(b):
        for h, g in enumerate(heads_of(hq, hkv)):
            s = q[bi, :, h] @ k[bi, :, g].T / math.sqrt(d)
            if mask is not None:
                s[:, ~np.asarray(mask[bi])] = -np.inf
            for i in range(lq):
                for t in range(lk):
                    if not sees(i, t, span):
                        s[i, t] = -np.inf
            p, lse[bi, h] = _softmax_rows(s)
            out[bi, :, h] = p @ np.where(p.any(0)[:, None], v[bi, :, g], 0.0)
    return out, lse


def norm_perm(x, mask=None):
    """[B, L, H, D] -> perm [B, H, L]: ascending norm, masked tokens last, ties positional."""
    x = np.asarray(x, np.float64)
    b, l, h, _ = x.shape
    perm = np.zeros((b, h, l), np.int64)
    for bi in range(b):
        for hi in range(h):
            norms = np.linalg.norm(x[bi, :, hi], axis=-1)
            real = np.ones(l, bool) if mask is None else np.asarray(mask[bi])
            order = sorted(range(l), key=lambda i: (not real[i], norms[i] if real[i] else 0.0, i))
            perm[bi, hi] = order
    return perm


def blocks(perm_row, length, block):
    """List of token-position lists, one per block, from a permutation (or positional)."""
    order = list(range(length)) if perm_row is None else list(perm_row)
    return [order[i : i + block] for i in range(0, length, block)]


def block_pairs(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None):
    """Yields (batch, q head, kv head, a, j, query positions, real key positions) per block pair holding a real key."""
    b, lq, hq, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    for bi in range(b):
        real = np.ones(lk, bool) if mask is None else np.asarray(mask[bi])
        for h, g in enumerate(heads_of(hq, hkv)):
            qb = blocks(None if q_perm is None else q_perm[bi, h], lq, block_q)
            kb = blocks(None if k_perm is None else k_perm[bi, g], lk, block_k)
            for a, qi in enumerate(qb):
                for j, kj in enumerate(kb):
                    kj = [t for t in kj if real[t]]
                    if kj:
                        yield bi, h, g, a, j, qi, kj


def num_blocks(q, k, block_q, block_k):
    return -(-q.shape[1] // block_q), -(-k.shape[1] // block_k)


def pre_scores(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None, beta=None, count_term=True,
               span=None):
    """BA-Att block logits. Under ``span``: -inf where no (query, key) pair of the blocks is allowed; where
    only some are, the mean logit over the allowed pairs plus log(allowed pairs / queries), no compensation."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    d = q.shape[-1]
    out = np.full((q.shape[0], q.shape[2]) + num_blocks(q, k, block_q, block_k), -np.inf)
    for bi, h, g, a, j, qi, kj in block_pairs(q, k, block_q, block_k, mask=mask, q_perm=q_perm, k_perm=k_perm):
        pairs = [(i, t) for i in qi for t in kj if sees(i, t, span)]
        if not pairs:
            continue
        if len(pairs) < len(qi) * len(kj):
            logits = [q[bi, i, h] @ k[bi, t, g] / math.sqrt(d) for i, t in pairs]
            out[bi, h, a, j] = np.mean(logits) + (math.log(len(pairs) / len(qi)) if count_term else 0.0)
            continue
        xq, xk = q[bi, qi, h], k[bi, kj, g]
        qm, qv = xq.mean(0), xq.var(0)
        km, kv = xk.mean(0), xk.var(0)
        s = qm @ km / math.sqrt(d)
        if beta is not None:
            s += beta * np.sum(qv * km**2 + kv * qm**2 + qv * kv) / d
        if count_term:
            s += math.log(len(kj))
        out[bi, h, a, j] = s
    return out


def post_map(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None, span=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    out = np.zeros((b, hq, nq, nk))
    for bi in range(b):
        for h, g in enumerate(heads_of(hq, hkv)):
            s = q[bi, :, h] @ k[bi, :, g].T / math.sqrt(d)
            if mask is not None:
                s[:, ~np.asarray(mask[bi])] = -np.inf
            for i in range(lq):
                for t in range(lk):
                    if not sees(i, t, span):
                        s[i, t] = -np.inf
            a_full, _ = _softmax_rows(s)
            qb = blocks(None if q_perm is None else q_perm[bi, h], lq, block_q)
            kb = blocks(None if k_perm is None else k_perm[bi, g], lk, block_k)
            for a, qi in enumerate(qb):
                for j, kj in enumerate(kb):
                    out[bi, h, a, j] = a_full[np.ix_(qi, kj)].sum() / len(qi)
    return out


def block_sparse(q, k, v, indices, counts, block_q, block_k, *, mask=None, q_perm=None, k_perm=None, span=None):
    """Exact softmax restricted to the keys of the selected blocks (that the query may see), per query."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, lq, hq, v.shape[-1]))
    lse = np.zeros((b, hq, lq))
    for bi in range(b):
        real = np.ones(lk, bool) if mask is None else np.asarray(mask[bi])
        for h, g in enumerate(heads_of(hq, hkv)):
            qb = blocks(None if q_perm is None else q_perm[bi, h], lq, block_q)
            kb = blocks(None if k_perm is None else k_perm[bi, g], lk, block_k)
            for a, qi in enumerate(qb):
                keys = [t for j in indices[bi, h, a, : counts[bi, h, a]] for t in kb[j] if real[t]]
                s = q[bi, qi, h] @ k[bi, keys, g].T / math.sqrt(d)
                for r, i in enumerate(qi):
                    s[r, [c for c, t in enumerate(keys) if not sees(i, t, span)]] = -np.inf
                p, lse[bi, h, qi] = _softmax_rows(s)
                out[bi, qi, h] = p @ np.where(p.any(0)[:, None], v[bi, keys, g], 0.0)
    return out, lse


def topk_rows(scores, kappa):
    """Set of kept block ids per row: the kappa largest finite scores."""
    b, h, nq, nk = scores.shape
    kept = np.zeros(scores.shape, bool)
    for idx in np.ndindex(b, h, nq):
        row = scores[idx]
        finite = [j for j in range(nk) if np.isfinite(row[j])]
        for j in sorted(finite, key=lambda j: -row[j])[:kappa]:
            kept[idx + (j,)] = True
    return kept


def tau_rows(scores, tau, min_blocks=1, max_blocks=None):
    b, h, nq, nk = scores.shape
    kept = np.zeros(scores.shape, bool)
    for idx in np.ndindex(b, h, nq):
        row = scores[idx]
        finite = [j for j in range(nk) if np.isfinite(row[j])]
        p = np.exp(row[finite] - row[finite].max())
        p /= p.sum()
        mass = dict(zip(finite, p))
        order = sorted(finite, key=lambda j: -row[j])
        total, n = 0.0, 0
        for j in order:
            n += 1
            total += mass[j]
            if total >= tau - 1e-6:
                break
        n = max(n, min_blocks)
        if max_blocks is not None:
            n = min(n, max_blocks)
        n = min(n, len(finite))
        for j in order[:n]:
            kept[idx + (j,)] = True
    return kept


def bound_and_deviation(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    d = q.shape[-1]
    u = np.zeros((q.shape[0], q.shape[2]) + num_blocks(q, k, block_q, block_k))
    dev = np.zeros_like(u)
    for bi, h, g, a, j, qi, kj in block_pairs(q, k, block_q, block_k, mask=mask, q_perm=q_perm, k_perm=k_perm):
        xq, xk = q[bi, qi, h], k[bi, kj, g]
        qm, km = xq.mean(0), xk.mean(0)
        rq, mq = np.linalg.norm(xq - qm, axis=-1).max(), np.linalg.norm(xq, axis=-1).max()
        rk, mk = np.linalg.norm(xk - km, axis=-1).max(), np.linalg.norm(xk, axis=-1).max()
        u[bi, h, a, j] = (rq * mk + mq * rk + rq * rk) / math.sqrt(d)
        dev[bi, h, a, j] = np.abs(xq @ xk.T / math.sqrt(d) - qm @ km / math.sqrt(d)).max()
    return u, dev
