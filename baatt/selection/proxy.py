"""Proxy-head selection: token-level scores of one head-averaged head, max-pooled to blocks.

Follows the score estimate of ProxyAttn (Wang et al., arXiv 2509.24745): heads of a layer
tend to attend to the same tokens, so one representative head, pooled over the head axis
instead of over the sequence, can score every token pair cheaply, and pooling its
token-level scores with a max keeps a single strong key visible, where a block mean dilutes it.

1. One proxy per ``kv_heads_per_proxy`` kv heads (default: one per kv head, i.e. per GQA group):
   ``Q~`` is the mean of the queries of all query heads of those kv heads, ``K~`` the mean of
   their keys.
2. Strided queries: in every query block the queries at offsets ``stride - 1, 2*stride - 1, ...``
   (in a ragged last block, clipped to its last real query) take the proxy's exact softmax over
   all valid keys, ``p[i, j] = softmax_j(q~_i . k~_j / sqrt(d))``.
3. Max-pooling: ``S[a, b] = max_{strided i in a} max_{j in b} p[i, j]``; the block scores are
   ``log S`` and every query head of the proxy shares them. The mass of the ``tau`` and peak
   rules is ``S`` with each row normalised.

Where we deviate: ProxyAttn pairs the shared scores with a per-head, block-aware dynamic budget;
here every head goes through the shared budget step (``common.finish``: sparsity, ``tau``, the
peak rule, forced blocks) so that selectors compare at equal budgets. A max over keys does not
grow with a block's size, so there is no count term (``count_correction`` does not apply).
Under a causal or block-causal ``BAConfig.mask`` each strided query's softmax runs over the keys
it may see. Blocks are positional (``BAConfig`` refuses sorting, clustering and compensation
for it); ``stride`` must divide ``block_q`` and ``kv_heads_per_proxy`` must divide the number
of kv heads.

Cost, as a fraction of dense attention's ``4 * Lq * Lk * d`` FLOPs per query head: each proxy
takes ``2 * (Lq / stride) * Lk * d`` and serves ``kv_heads_per_proxy * G`` query heads
(``G = Hq / Hkv``), so

    1 / (2 * stride * kv_heads_per_proxy * G)

e.g. 1.04% at the defaults (stride 16, one kv head per proxy) for G = 3 (SmolLM2), 0.78% for
G = 4; a model without GQA (G = 1) needs ``kv_heads_per_proxy * stride >= 50`` to stay under 1%.
Averaging the heads adds ``Lq * d`` per query head, negligible. Memory: ``block_q / stride x Lk``
scores per proxy for a few query blocks at a time.

Parameters: ``ProxyParams`` (``BAConfig(selector="proxy", selector_params=ProxyParams(...))``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt.config import BAConfig
from baatt.selection.common import finish, positional_space
from baatt.selection.query_token import key_limits, map_query_blocks, masked_keys, visible_keys
from baatt.selection.types import BlockSelection
from baatt.selector_registry import SelectorParamError, register_selector

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ProxyParams:
    """stride: one scored query every ``stride`` queries; kv_heads_per_proxy: kv heads (with their
    query heads) averaged into one proxy head."""

    stride: int = 16
    kv_heads_per_proxy: int = 1

    def __post_init__(self):
        for name in ("stride", "kv_heads_per_proxy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SelectorParamError(self, name, "must be an int >= 1")


def _params(config: BAConfig, kv_heads: int) -> ProxyParams:
    params = config.params_for("proxy")
    if config.block_q % params.stride:
        raise ValueError(f"proxy needs block_q ({config.block_q}) to be a multiple of ProxyParams.stride "
                         f"({params.stride})")
    if kv_heads % params.kv_heads_per_proxy:
        raise ValueError(f"proxy needs ProxyParams.kv_heads_per_proxy ({params.kv_heads_per_proxy}) to divide "
                         f"the kv heads ({kv_heads})")
    return params


def block_scores(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Block scores ``log S`` [B, Hq, Nq, Nk] float32 (``-inf`` for key blocks without a valid key and
    for those ``config.mask`` hides)."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    params = _params(config, hkv)
    space = positional_space(q, k, config, key_mask)
    k_valid = masked_keys(space)
    nq, nk, bq, bk = space.num_q_blocks, space.num_k_blocks, config.block_q, config.block_k
    per = params.kv_heads_per_proxy
    proxies, lq, lk = hkv // per, space.q.shape[2], k_valid.shape[2]
    q_proxy = jnp.mean(space.q.astype(jnp.float32).reshape(b, proxies, hq // proxies, lq, d), axis=2)
    k_proxy = jnp.mean(k_valid.reshape(b, proxies, per, lk, d), axis=2)
    key_ok = space.kv_valid[:, :1, None, :]  # the same keys are valid for every head: [B, 1, 1, Lk_pad]

    # Strided queries of every block, clipped to the block's last real query: [Nq, B, proxies, bq/stride, D].
    n_real = jnp.sum(space.q_valid.reshape(b, nq, bq), axis=-1)  # [B, Nq]
    offsets = jnp.arange(params.stride - 1, bq, params.stride)
    pos = jnp.minimum(offsets, jnp.maximum(n_real[..., None] - 1, 0)) + (jnp.arange(nq) * bq)[:, None]
    strided = jnp.take_along_axis(q_proxy, pos.reshape(b, 1, -1, 1), axis=2)
    strided = jnp.moveaxis(strided.reshape(b, proxies, nq, offsets.size, d), 2, 0)
    limit = key_limits(space, pos)  # under a causal mask, the strided queries' key limits
    limit = jnp.moveaxis(jnp.full(pos.shape, lk) if limit is None else limit, 1, 0)  # [Nq, B, bq/stride]
    scale = 1.0 / math.sqrt(d)

    def one_block(args):
        qa, lim = args  # [B, proxies, bq/stride, D], the strided queries' key limits [B, bq/stride]
        s = jnp.einsum("bprd,bpkd->bprk", qa, k_proxy, precision=HIGHEST) * scale
        s = jnp.where(visible_keys(key_ok, lim[:, None, :]), s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        log_p = jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)
        pooled = jnp.max(log_p.reshape(log_p.shape[:-1] + (nk, bk)), axis=(-3, -1))  # [B, proxies, Nk]
        return pooled[:, :, None, :]  # one "group" per proxy, for map_query_blocks' layout

    scores = map_query_blocks(one_block, (strided, limit), elements_per_block=b * proxies * offsets.size * lk)
    return jnp.repeat(scores, hq // proxies, axis=1)  # [B, Hq, Nq, Nk]: each proxy's query heads share it


def select(q, k, config: BAConfig, *, key_mask=None) -> BlockSelection:
    # softmax(log S), the budget step's default mass, is S with each row normalised.
    return finish(block_scores(q, k, config, key_mask=key_mask), q, k, config)


def block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """``S`` with each row normalised."""
    return jax.nn.softmax(block_scores(q, k, config, key_mask=key_mask), axis=-1)


register_selector("proxy", select=select, block_map=block_map, params=ProxyParams)
