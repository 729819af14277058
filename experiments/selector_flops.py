"""Each selector's estimator FLOPs over dense attention, from the formula its docstring states.

Shared by the studies that report a cost beside a quality or a time (``selectors_real_qk``,
``bench_selectors``); a formula, not a measurement.
"""

from __future__ import annotations

import baatt


def flop_fraction(config: baatt.BAConfig, *, length: int, q_heads: int, kv_heads: int) -> float:
    """The estimator's FLOPs over bidirectional dense attention's ``4 L^2 d`` per query head, from the
    formula each selector's docstring states (head_dim cancels everywhere)."""
    bq, bk, name = config.block_q, config.block_k, config.selector
    params = config.params_for(name)
    if name == "oracle":  # two passes over Q K^T: the row log-sum-exp, then the pooled mass
        return 1.0
    if name == "max_oracle":  # one pass over Q K^T
        return 0.5
    if name in ("baatt", "meanpool", "sparge_like"):  # pooled Q against pooled K
        terms = 3 if name == "baatt" and config.compensate else 1
        return terms / (2 * bq * bk)
    if name == "xattention":
        return 1 / (2 * params.stride)
    if name == "last_query":
        return min(params.size, length) / (2 * length)
    if name == "query_token":
        return (2 if params.variance_weight else 1) / (2 * bk)
    if name == "quest":
        return 1 / bk
    if name == "mixed":
        return params.probes / (2 * bq) + 1 / (2 * params.group**2)
    if name == "pooled_query":  # one mean query per query block against every key
        return 1 / (2 * bq)
    if name == "proxy":
        return 1 / (2 * params.stride * params.kv_heads_per_proxy * (q_heads // kv_heads))
    if name in ("random", "dense"):  # no estimator: random scores, or every block
        return 0.0
    raise ValueError(f"no FLOP formula for selector {name!r}")
