"""Independent float64 NumPy implementations of the specification, written loop-first for clarity.

They share nothing with the package: every formula is re-derived from docs/spec.md.
"""

from __future__ import annotations

import math

import numpy as np


def heads_of(hq, hkv):
    return [h // (hq // hkv) for h in range(hq)]


def dense(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    out = np.zeros((b, lq, hq, v.shape[-1]))
    lse = np.zeros((b, hq, lq))
    for bi in range(b):
        for h, g in enumerate(heads_of(hq, hkv)):
            s = q[bi, :, h] @ k[bi, :, g].T / math.sqrt(d)
            if mask is not None:
                s[:, ~np.asarray(mask[bi])] = -np.inf
            m = s.max(-1, keepdims=True)
            p = np.exp(s - m)
            lse[bi, h] = (m[:, 0] + np.log(p.sum(-1)))
            out[bi, :, h] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, g]
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


def pre_scores(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None, beta=None, count_term=True):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    d = q.shape[-1]
    out = np.full((q.shape[0], q.shape[2]) + num_blocks(q, k, block_q, block_k), -np.inf)
    for bi, h, g, a, j, qi, kj in block_pairs(q, k, block_q, block_k, mask=mask, q_perm=q_perm, k_perm=k_perm):
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


def post_map(q, k, block_q, block_k, *, mask=None, q_perm=None, k_perm=None):
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
            a_full = np.exp(s - s.max(-1, keepdims=True))
            a_full /= a_full.sum(-1, keepdims=True)
            qb = blocks(None if q_perm is None else q_perm[bi, h], lq, block_q)
            kb = blocks(None if k_perm is None else k_perm[bi, g], lk, block_k)
            for a, qi in enumerate(qb):
                for j, kj in enumerate(kb):
                    out[bi, h, a, j] = a_full[np.ix_(qi, kj)].sum() / len(qi)
    return out


def block_sparse(q, k, v, indices, counts, block_q, block_k, *, mask=None, q_perm=None, k_perm=None):
    """Exact softmax restricted to the keys of the selected blocks, per query."""
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
                m = s.max(-1, keepdims=True)
                p = np.exp(s - m)
                lse[bi, h, qi] = m[:, 0] + np.log(p.sum(-1))
                out[bi, qi, h] = (p / p.sum(-1, keepdims=True)) @ v[bi, keys, g]
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
