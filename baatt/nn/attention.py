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

Causal and block-causal models (``ModelConfig.causality``) run dense attention
with their mask; a BA-Att layer in such a model raises ``NotImplementedError``
(the block-sparse operators are bidirectional).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

import baatt
from baatt.config import BAConfig
from baatt.nn.config import CAUSALITIES


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
    """

    kind: Literal["dense", "ba"] = "dense"
    config: BAConfig | None = None
    compensate_layers: tuple[Any, ...] | None = None
    layer_configs: tuple[_LayerSpec, ...] | None = None
    implementation: Any = None
    dense_implementation: str | None = None

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
        if self.layer_configs is not None:
            if not isinstance(self.layer_configs, tuple) or any(
                c is not None and not isinstance(c, BAConfig) for c in self.layer_configs
            ):
                raise ValueError("AttentionPlan.layer_configs must be a tuple of BAConfig or None")

    @classmethod
    def dense(cls, implementation: str | None = None) -> "AttentionPlan":
        return cls(kind="dense", implementation=implementation)

    @classmethod
    def ba(cls, config: BAConfig | None = None, *, compensate_layers=None, implementation=None, **config_fields) -> "AttentionPlan":
        config = (config or BAConfig()).replace(**config_fields) if config_fields else (config or BAConfig())
        if compensate_layers is not None:
            compensate_layers = tuple(compensate_layers)
        return cls(kind="ba", config=config, compensate_layers=compensate_layers, implementation=implementation)

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


def run_layer_attention(plan: AttentionPlan, layer: int, num_layers: int, q, k, v, *, key_mask=None, selection=None,
                        causality: str = "bidirectional", causal_block_size: int | None = None):
    """Attention of one layer under ``plan``.

    selection: a ``baatt.BlockSelection`` to reuse (skips the estimator; runs
      ``baatt.reference.block_sparse_attention``). Returns (out, info) where info
      holds ``selection`` and ``density`` [B, Hq] (None for dense layers).
    causality, causal_block_size: the model's mask (``ModelConfig``); anything but
      "bidirectional" runs dense attention only.
    """
    cfg = plan.layer_config(layer, num_layers)
    if causality != "bidirectional" and (cfg is not None or selection is not None):
        what = "a reused block selection" if selection is not None else f"BA-Att ({cfg.selector}, sparsity={cfg.sparsity})"
        raise NotImplementedError(
            f"sparse causal attention is not supported yet: layer {layer} would run {what} in a model with "
            f"causality={causality!r}; use AttentionPlan.dense() for causal and block-causal models"
        )
    if selection is not None:
        out, _ = baatt.reference.block_sparse_attention(q, k, v, selection, key_mask=key_mask)
        nk = -(-k.shape[1] // selection.block_k)
        return out, dict(selection=selection, density=selection.density(nk))
    if cfg is None:
        impl = plan.implementation if plan.kind == "dense" else plan.dense_implementation
        out = dense_attention(q, k, v, key_mask=key_mask, implementation=impl, causality=causality,
                              causal_block_size=causal_block_size)
        return out, dict(selection=None, density=jnp.ones((q.shape[0], q.shape[2]), jnp.float32))
    out, stats = baatt.attention(q, k, v, config=cfg, key_mask=key_mask, implementation=plan.implementation, return_stats=True)
    return out, dict(selection=stats["selection"], density=stats["density"])


def ba_attention_fn(config: BAConfig | None = None, *, implementation: str | Sequence[str] | None = None, interpret: bool = False):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that runs ``baatt.attention``.

    ``nnx.MultiHeadAttention(..., attention_fn=ba_attention_fn(BAConfig(sparsity=0.5)))``.
    Supports key-padding masks (e.g. ``nnx.make_attention_mask(tokens > 0, tokens > 0)``:
    a key is kept when any query row keeps it, so padded query rows are not
    special). Bias, dropout and causal masks are not supported: they raise.
    """
    config = BAConfig() if config is None else config

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                     dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                     promote_dtype=None, is_causal=False, **unused):
        del broadcast_dropout, dropout_rng, precision, module, promote_dtype, unused
        if bias is not None:
            raise ValueError("ba_attention_fn does not support an attention bias (bias must be None)")
        if is_causal:
            raise ValueError("ba_attention_fn is bidirectional: is_causal must be False")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("ba_attention_fn does not support attention dropout (dropout_rate must be 0 or deterministic=True)")
        batch_dims = query.shape[:-3]
        q = query.reshape((-1,) + query.shape[-3:])
        k = key.reshape((-1,) + key.shape[-3:])
        v = value.reshape((-1,) + value.shape[-3:])
        if dtype is not None:
            q, k, v = (x.astype(dtype) for x in (q, k, v))
        key_mask = None
        if mask is not None:
            m = jnp.broadcast_to(mask, batch_dims + mask.shape[-3:]).reshape((-1,) + mask.shape[-3:])
            if not isinstance(m, jax.core.Tracer):
                full = jnp.any(m, axis=(1, 2))
                rows_ok = jnp.all(jnp.where(jnp.any(m, axis=-1, keepdims=True), m == full[:, None, None, :], True))
                if not bool(rows_ok):
                    raise ValueError(
                        "ba_attention_fn supports key-padding masks only (every query row keeps the same keys); "
                        "got a mask that differs between query rows (causal or banded)"
                    )
            key_mask = jnp.any(m, axis=(1, 2))
        out = baatt.attention(q, k, v, config=config, key_mask=key_mask, implementation=implementation, interpret=interpret)
        return out.reshape(batch_dims + out.shape[1:])

    return attention_fn
