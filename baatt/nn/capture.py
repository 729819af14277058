"""Queries, keys and values of a model's layers, as the attention of those layers sees them.

``capture_qkv`` runs the model block by block and keeps, for each chosen layer, the
post-rotary queries and keys and the values: real attention inputs for studying block
selection offline. Long inputs stream: each layer's arrays go to ``.npy`` files as soon
as the layer has run, and the forward stops after the deepest chosen layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from baatt.nn.attention import AttentionPlan
from baatt.nn.model import DiffusionLM


@nnx.jit(static_argnames=("plan", "layer", "capture"))
def _run_block(block, x, cos, sin, key_mask, *, plan, layer, capture):
    return block(x, cos, sin, plan=plan, layer=layer, key_mask=key_mask, capture=capture)


def capture_path(out_dir: str | os.PathLike, layer: int, name: str) -> Path:
    """File of one captured array: ``out_dir/layer{layer:03d}_{name}.npy`` (name "q", "k" or "v")."""
    return Path(out_dir) / f"layer{layer:03d}_{name}.npy"


def capture_qkv(model: DiffusionLM, tokens, *, layers: Iterable[int] | None = None,
                out_dir: str | os.PathLike | None = None, key_mask=None,
                attention: AttentionPlan | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Post-rotary q [B, L, Hq, D], k and v [B, L, Hkv, D] of the chosen layers, in float32.

    tokens: int [B, L]. layers: layer indices (negative ones count from the end; default every
      layer). key_mask, attention: as ``DiffusionLM.__call__`` (the model's own plan by default).
    out_dir: when given, each array is written to ``capture_path(out_dir, layer, name)`` once its
      layer has run and is returned memory-mapped (read-only), so only one layer is in memory.
    Returns {layer: {"q": ..., "k": ..., "v": ...}}, layers in increasing order. The layout of the
    head dimension is the model's ``rope_style`` (GGUF models: rotary pairs adjacent).
    """
    n = model.cfg.num_layers
    wanted = range(n) if layers is None else list(layers)
    chosen = set()
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
            raise ValueError(f"layers must hold layer indices in [-{n}, {n}); got {layer!r}")
        chosen.add(int(layer) % n)
    if not chosen:
        raise ValueError("layers must name at least one layer")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    plan = model.attention if attention is None else attention
    tokens = jnp.asarray(tokens)
    x, cos, sin = model.embed_inputs(tokens)
    captured: dict[int, dict[str, np.ndarray]] = {}
    # Blocks share one structure, so layers whose attention the plan configures alike (every layer of a
    # dense plan) run one compiled program: the layer index passed is the first such layer's.
    first_alike: dict = {}
    for i, block in enumerate(model.blocks[: max(chosen) + 1]):
        alike = first_alike.setdefault(plan.layer_config(i, n), i)
        x, info = _run_block(block, x, cos, sin, key_mask, plan=plan, layer=alike, capture=i in chosen)
        if i not in chosen:
            continue
        arrays = {name: np.asarray(info[name], np.float32) for name in ("q", "k", "v")}
        if out_dir is not None:
            for name, array in arrays.items():
                np.save(capture_path(out_dir, i, name), array)
            arrays = {name: np.load(capture_path(out_dir, i, name), mmap_mode="r") for name in arrays}
        captured[i] = arrays
    return captured
