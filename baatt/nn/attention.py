"""Pluggable attention for the DLM, and an ``nnx.MultiHeadAttention`` adapter for BA-Att.

An :class:`AttentionPlan` (frozen, hashable: a static argument of ``jax.jit``)
says which attention each layer runs:

- ``AttentionPlan.dense()``: ``jax.nn.dot_product_attention`` (cuDNN on a GPU
  for bf16/f16 inputs without a key mask, XLA elsewhere);
- ``AttentionPlan.ba(config, compensate_layers=("first", "last"))``:
  ``baatt.attention`` with ``config`` in every layer, compensation switched on
  only in the listed layers (``"first"``, ``"last"``, or layer indices; ``None``
  keeps ``config.compensate`` everywhere);
- ``AttentionPlan(kind="ba", layer_configs=(...))``: one BAConfig per layer;
  ``None`` in that tuple means dense attention for that layer.

Every attention function has the signature ``fn(q, k, v, *, key_mask) -> out``
with q [B, L, Hq, D], k/v [B, L, Hkv, D] and key_mask bool [B, L] or None.

Causal and block-causal models (``ModelConfig.causality``) run every layer under
their mask: dense layers through ``jax.nn.dot_product_attention``, BA-Att layers
through ``baatt.attention`` with the mask in their config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import checkify

import baatt
from baatt.attention_mask import CAUSAL, AttentionMask
from baatt.config import BAConfig
from baatt.nn.config import CAUSALITIES
from baatt.selection.calibrate import Budgets
from baatt.selector_registry import get_selector
from baatt.validation import is_concrete, nan_where


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:  # pragma: no cover
        return False


def block_causal_mask(length: int, block_size: int):
    """bool [length, length]: query i sees key j when j's block (of ``block_size`` tokens) is not after i's."""
    block = jnp.arange(length) // block_size
    return block[None, :] <= block[:, None]


def dense_attention(q, k, v, *, key_mask=None, implementation: str | None = None, causality: str = "bidirectional",
                    causal_block_size: int | None = None):
    """Softmax attention through ``jax.nn.dot_product_attention``.

    causality: "bidirectional", "causal" or "block_causal" (with ``causal_block_size``), as
      ``ModelConfig.causality``.
    implementation: None picks cuDNN on a GPU when it applies (bf16/f16, no key mask or
      block-causal mask, head_dim <= 128 and a multiple of 8), else XLA; or force "xla"/"cudnn".
    """
    if causality not in CAUSALITIES:
        raise ValueError(f"causality must be one of {CAUSALITIES}; got {causality!r}")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if causality == "block_causal":
        if causal_block_size is None or causal_block_size < 1:
            raise ValueError(f"causal_block_size must be a positive int for block_causal; got {causal_block_size!r}")
        blocks = block_causal_mask(q.shape[1], causal_block_size)[None, None]
        mask = blocks if mask is None else mask & blocks
    if implementation is None:
        ok = _on_gpu() and mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
        implementation = "cudnn" if ok else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causality == "causal",
                                        implementation=implementation)


_LayerSpec = BAConfig | None


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which attention each layer runs (see the module docstring).

    kind: "dense" or "ba". config: the BAConfig of every layer (kind "ba").
    compensate_layers: None (keep ``config.compensate``), or a tuple of
      "first" / "last" / layer indices where compensation is on (off elsewhere).
    layer_configs: explicit per-layer BAConfig or None (dense); overrides config.
    implementation: passed to ``baatt.attention`` (None = best available) or to
      ``dense_attention`` for dense layers ("xla"/"cudnn"/None).
    dense_implementation: implementation of the dense layers of a "ba" plan.
    budgets: ``baatt.selection.calibrate.Budgets``: the BA-Att layers it calibrated keep its
      per-head counts (``baatt.attention(head_budget=...)``) instead of their config's budget.
    """

    kind: Literal["dense", "ba"] = "dense"
    config: BAConfig | None = None
    compensate_layers: tuple[Any, ...] | None = None
    layer_configs: tuple[_LayerSpec, ...] | None = None
    implementation: Any = None
    dense_implementation: str | None = None
    budgets: Any = None

    def __post_init__(self):
        if self.kind not in ("dense", "ba"):
            raise ValueError(f"AttentionPlan.kind must be 'dense' or 'ba'; got {self.kind!r}")
        if self.kind == "ba" and self.config is None and self.layer_configs is None:
            raise ValueError("AttentionPlan.kind='ba' needs a config or layer_configs")
        if self.config is not None and not isinstance(self.config, BAConfig):
            raise ValueError(f"AttentionPlan.config must be a baatt.BAConfig; got {type(self.config).__name__}")
        if self.compensate_layers is not None:
            if not isinstance(self.compensate_layers, tuple):
                raise ValueError(f"AttentionPlan.compensate_layers must be a tuple or None; got {self.compensate_layers!r}")
            for x in self.compensate_layers:
                if x not in ("first", "last") and not (isinstance(x, int) and not isinstance(x, bool)):
                    raise ValueError(f"AttentionPlan.compensate_layers entries must be 'first', 'last' or ints; got {x!r}")
            if self.config is not None and "compensate" not in get_selector(self.config.selector).switches:
                raise ValueError(f"AttentionPlan.compensate_layers needs a selector that applies compensation; "
                                 f"{self.config.selector!r} does not")
        if self.budgets is not None and not isinstance(self.budgets, Budgets):
            raise ValueError(f"AttentionPlan.budgets must be a baatt.selection.calibrate.Budgets or None; "
                             f"got {type(self.budgets).__name__}")
        if self.layer_configs is not None:
            if not isinstance(self.layer_configs, tuple) or any(
                c is not None and not isinstance(c, BAConfig) for c in self.layer_configs
            ):
                raise ValueError("AttentionPlan.layer_configs must be a tuple of BAConfig or None")

    @classmethod
    def dense(cls, implementation: str | None = None) -> AttentionPlan:
        return cls(kind="dense", implementation=implementation)

    @classmethod
    def ba(cls, config: BAConfig | None = None, *, compensate_layers=None, implementation=None, budgets=None,
           **config_fields) -> AttentionPlan:
        config = (config or BAConfig()).replace(**config_fields) if config_fields else (config or BAConfig())
        if compensate_layers is not None:
            compensate_layers = tuple(compensate_layers)
        return cls(kind="ba", config=config, compensate_layers=compensate_layers, implementation=implementation,
                   budgets=budgets)

    def layer_config(self, layer: int, num_layers: int) -> BAConfig | None:
        """The BAConfig of ``layer`` (None = dense)."""
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer must lie in [0, {num_layers}); got {layer}")
        if self.kind == "dense":
            return None
        if self.layer_configs is not None:
            if len(self.layer_configs) != num_layers:
                raise ValueError(
                    f"AttentionPlan.layer_configs must have one entry per layer ({num_layers}); got {len(self.layer_configs)}"
                )
            return self.layer_configs[layer]
        cfg = self.config
        if self.compensate_layers is not None:
            wanted = set()
            for x in self.compensate_layers:
                wanted.add(0 if x == "first" else num_layers - 1 if x == "last" else x % num_layers)
            cfg = cfg.replace(compensate=layer in wanted)
        return cfg

    def describe(self, num_layers: int) -> list[str]:
        out = []
        for i in range(num_layers):
            c = self.layer_config(i, num_layers)
            out.append("dense" if c is None else
                       f"{c.selector} s={c.sparsity} tau={c.tau} sortq={c.sort_q} sortk={c.sort_k} comp={c.compensate} beta={c.beta}")
        return out


def _model_mask(causality: str, causal_block_size: int | None = None) -> AttentionMask:
    """The ``baatt.AttentionMask`` of a model's ``causality`` (``ModelConfig``)."""
    if causality not in CAUSALITIES:
        raise ValueError(f"causality must be one of {CAUSALITIES}; got {causality!r}")
    if causality == "block_causal":
        return AttentionMask.block_causal(causal_block_size)
    return AttentionMask(causality)


def run_layer_attention(plan: AttentionPlan, layer: int, num_layers: int, q, k, v, *, key_mask=None, selection=None,
                        query_positions=None, causality: str = "bidirectional", causal_block_size: int | None = None):
    """Attention of one layer under ``plan``.

    selection: a ``baatt.BlockSelection`` to reuse: the estimator is skipped and the
      selection runs through ``baatt.attention(..., selection=...)`` on the plan's
      implementation (the best available by default), with the layer's config for the rest
      (its ``tail``, say). Returns (out, info) where info holds ``selection`` and
      ``density`` [B, Hq] (None and 1 for dense layers).
    query_positions: int [B or 1, m]: the queries a BA-Att layer's selector estimates from
      (``baatt.attention(query_positions=...)``); unused by dense layers and with a ``selection``.
    causality, causal_block_size: the model's mask (``ModelConfig``). Dense layers run
      ``dense_attention`` under it; BA-Att layers run with it as their config's ``mask``
      (so their configs may not sort tokens).
    """
    cfg = plan.layer_config(layer, num_layers)
    if cfg is None and selection is None:
        impl = plan.implementation if plan.kind == "dense" else plan.dense_implementation
        out = dense_attention(q, k, v, key_mask=key_mask, implementation=impl, causality=causality,
                              causal_block_size=causal_block_size)
        return out, dict(selection=None, density=jnp.ones((q.shape[0], q.shape[2]), jnp.float32))
    if cfg is None:  # a selection given for a layer the plan runs dense: only the selection's block sizes
        cfg = BAConfig(block_size=selection.block_q, block_size_k=selection.block_k)
    cfg = cfg.replace(mask=_model_mask(causality, causal_block_size))
    head_budget = None
    if plan.budgets is not None and selection is None:
        head_budget = plan.budgets.head_counts(layer, -(-k.shape[1] // cfg.block_k))
    out, stats = baatt.attention(q, k, v, config=cfg, key_mask=key_mask, implementation=plan.implementation,
                                 selection=selection, return_stats=True, head_budget=head_budget,
                                 query_positions=None if selection is not None else query_positions)
    return out, dict(selection=stats["selection"], density=stats["density"])


def _as_mask(mask, batch_dims: tuple[int, ...]) -> jax.Array:
    """bool [B, H or 1, Lq or 1, Lk] from a mask in ``flax.nnx.MultiHeadAttention``'s form (any dtype, nonzero = attend)."""
    m = jnp.asarray(mask) != 0
    m = m.reshape((1,) * max(0, 3 - m.ndim) + m.shape)
    return jnp.broadcast_to(m, batch_dims + m.shape[-3:]).reshape((-1,) + m.shape[-3:])


def _rows_agree(m: jax.Array, key_mask: jax.Array, visible: jax.Array | None) -> jax.Array:
    """bool [B]: every (head, query) row of ``m`` that keeps a key keeps exactly ``key_mask``, limited to the keys
    the row sees under ``visible`` [Lq, Lk] (a causal mask) when given."""
    expected = key_mask[:, None, None, :] if visible is None else key_mask[:, None, None, :] & visible
    return jnp.all(~jnp.any(m, axis=-1, keepdims=True) | (m == expected), axis=(1, 2, 3))


def ba_attention_fn(config: BAConfig | None = None, *, implementation: str | Sequence[str] | None = None,
                    interpret: bool = False, debug_checks: bool = False):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that runs ``baatt.attention``.

    ``nnx.MultiHeadAttention(..., attention_fn=ba_attention_fn(BAConfig(sparsity=0.5)))``.

    Masks: a key-padding mask, i.e. one whose rows (queries and heads) all keep the
    same keys (e.g. ``nnx.make_attention_mask(tokens > 0, tokens > 0)``), alone or
    with causal attention: ``is_causal=True`` (``MultiHeadAttention``'s keyword), or a
    concrete mask that is a causal mask and a key-padding mask combined (e.g.
    ``nnx.make_causal_mask``), runs ``baatt.attention(..., is_causal=True)``. A row
    that keeps no key (a padded query) is not special: it attends like the others.
    Any other mask (banded, per head) is never dropped silently:

    * a concrete mask raises ``ValueError``;
    * a traced one (under ``nnx.jit`` and the other transforms its values are unknown
      when the layer is traced, so a causal mask cannot be recognised: pass
      ``is_causal=True``) makes the output of every batch element whose mask breaks
      the rule NaN; with ``debug_checks=True`` a ``jax.experimental.checkify`` error
      says so as well.

    Bias and dropout raise. ``debug_checks`` is passed on to ``baatt.attention``.
    """
    config = BAConfig() if config is None else config

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     promote_dtype=None, is_causal=False, **unused):
        del broadcast_dropout, dropout_rng, precision, module, promote_dtype, unused
        if bias is not None:
            raise ValueError("ba_attention_fn does not support an attention bias (bias must be None)")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("ba_attention_fn does not support attention dropout (dropout_rate must be 0 or deterministic=True)")
        batch_dims = query.shape[:-3]
        q = query.reshape((-1,) + query.shape[-3:])
        k = key.reshape((-1,) + key.shape[-3:])
        v = value.reshape((-1,) + value.shape[-3:])
        if dtype is not None:
            q, k, v = (x.astype(dtype) for x in (q, k, v))
        causal = bool(is_causal)
        key_mask = rows_agree = None
        if mask is not None:
            m = _as_mask(mask, batch_dims)
            key_mask = jnp.any(m, axis=(1, 2))
            visible = jnp.asarray(CAUSAL.token_mask(q.shape[1], k.shape[1]))
            if m.shape[1] > 1 or m.shape[2] > 1:  # rows that may differ: check them
                rows_agree = _rows_agree(m & visible, key_mask, visible) if causal else _rows_agree(m, key_mask, None)
            if rows_agree is not None and is_concrete(rows_agree):
                if not bool(jnp.all(rows_agree)):
                    if causal or not bool(jnp.all(_rows_agree(m, key_mask, visible))):
                        raise ValueError(
                            "ba_attention_fn supports key-padding masks, alone or with causal attention "
                            "(is_causal=True, or a causal mask); got a mask that differs between query rows or "
                            "heads otherwise (banded, per head)"
                        )
                    causal = True  # a causal mask combined with a key-padding one
                rows_agree = None
            elif rows_agree is not None and debug_checks:
                checkify.check(jnp.all(rows_agree), "ba_attention_fn supports key-padding masks (with is_causal=True "
                               "for causal ones); the mask of batch element {b} differs between query rows or heads",
                               b=jnp.argmin(rows_agree))
        out = baatt.attention(q, k, v, config=config, key_mask=key_mask, implementation=implementation,
                              interpret=interpret, is_causal=causal, debug_checks=debug_checks)
        if rows_agree is not None:
            out = out + nan_where(~rows_agree)[:, None, None, None].astype(out.dtype)
        return out.reshape(batch_dims + out.shape[1:])

    return attention_fn
