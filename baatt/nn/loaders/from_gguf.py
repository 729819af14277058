"""Llama-architecture GGUF files (llama.cpp's format) -> (ModelConfig, DiffusionLM).

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised to float32 with
``gguf.quants.dequantize``. llama.cpp's converter permutes the rows of the Q and K
projections of each head from the halves layout to adjacent pairs, because its
rotary embedding turns adjacent pairs: the loaded model therefore uses
``rope_style="interleaved"`` (same attention, same logits as the original weights
with "half"; captured queries and keys are those rows permuted within each head).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from baatt.data.gguf_file import open_gguf, read_field
from baatt.nn.config import ModelConfig
from baatt.nn.loaders.checkpoint import GGUF_LLAMA, StoredTensor, assemble
from baatt.nn.model import DiffusionLM

SUPPORTED_ARCHITECTURES = ("llama",)


def _stored_tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, StoredTensor]:
    def reader_of(tensor):
        # a plain copy of the bytes first: dequantising through the file's memmap views is twice as slow
        return lambda: gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type).astype(np.float32, copy=False)

    # GGUF lists dimensions fastest-first (ne); the array view is the reverse, PyTorch's [out, in].
    return {t.name: StoredTensor(t.name, str(path), tuple(int(n) for n in reversed(t.shape)), reader_of(t))
            for t in reader.tensors}


def gguf_config(reader: gguf.GGUFReader, path: Path, **overrides) -> ModelConfig:
    """The ModelConfig of a Llama GGUF file (causal, interleaved rotary pairs), with field overrides."""
    arch = read_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture is {arch!r}; load_gguf supports {SUPPORTED_ARCHITECTURES}")

    def field(name, *default):
        return read_field(reader, f"{arch}.{name}", path, *default)

    d_model = int(field("embedding_length"))
    num_heads = int(field("attention.head_count"))
    head_dim = int(field("attention.key_length", d_model // num_heads))
    rotary_dims = int(field("rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise NotImplementedError(f"{path}: {arch}.rope.dimension_count={rotary_dims} (partial rotary embeddings); "
                                  f"only rotation of the whole head ({head_dim}) is supported")
    scaling = field("rope.scaling.type", "none")
    if scaling != "none":
        raise NotImplementedError(f"{path}: {arch}.rope.scaling.type={scaling!r}; only unscaled rotary embeddings are supported")
    tensors = {t.name: t for t in reader.tensors}
    vocab = field("vocab_size", None)
    if vocab is None:  # older files: the embedding's row count
        if GGUF_LLAMA.embed not in tensors:
            raise ValueError(f"{path}: tensor {GGUF_LLAMA.embed!r} is missing")
        vocab = int(tensors[GGUF_LLAMA.embed].shape[-1])
    fields = dict(
        vocab_size=int(vocab),
        mask_id=None,
        d_model=d_model,
        num_layers=int(field("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(field("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        mlp_dim=int(field("feed_forward_length")),
        max_len=int(field("context_length")),
        rope_theta=float(field("rope.freq_base", 10_000.0)),
        norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        tie_embeddings=GGUF_LLAMA.head not in tensors,
        rope_style="interleaved",
        causality="causal",
        dtype="float32",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def load_gguf(source: str | os.PathLike | gguf.GGUFReader, *, progress: bool = True,
              **overrides) -> tuple[ModelConfig, DiffusionLM]:
    """Load a Llama-architecture GGUF file (a path, or a ``gguf.GGUFReader`` of it) as (config, model).

    overrides: ModelConfig fields to change, e.g. ``dtype="bfloat16"`` (compute), ``param_dtype``,
      ``max_len`` or ``causality="bidirectional"``; a field that changes a weight's shape makes the
      load fail with the tensor named. progress: a tqdm bar while the tensors are dequantised.
    Raises FileNotFoundError for a missing file, ValueError for another architecture, missing
    metadata or a tensor that is missing, unexpected or of the wrong shape.
    """
    reader, path = open_gguf(source)
    cfg = gguf_config(reader, path, **overrides)
    model = assemble(cfg, GGUF_LLAMA, _stored_tensors(reader, path), source=str(path), progress=progress)
    return cfg, model
