"""Hugging Face checkpoint directories (config.json + safetensors) -> (ModelConfig, DiffusionLM).

Two families: Llama (``model_type`` "llama": LlamaForCausalLM, e.g. SmolLM2; causal) and
LLaDA (``model_type`` "llada": LLaDAModelLM; bidirectional masked diffusion). Both use the
halves layout of rotary embeddings. Weights come from ``model.safetensors`` or from the
shards listed by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from baatt.nn.config import ModelConfig
from baatt.nn.loaders.checkpoint import HF_LLADA, HF_LLAMA, Naming, StoredTensor, assemble
from baatt.nn.model import DiffusionLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "llada")


def _require(config: dict, key: str, source: Path):
    if key not in config:
        raise ValueError(f"{source}: field {key!r} is missing")
    return config[key]


def _reject(condition: bool, source: Path, what: str) -> None:
    if condition:
        raise NotImplementedError(f"{source}: {what} is not supported")


def _llama_config(config: dict, source: Path) -> dict:
    d_model = int(_require(config, "hidden_size", source))
    num_heads = int(_require(config, "num_attention_heads", source))
    _reject(config.get("hidden_act", "silu") != "silu", source, f"hidden_act={config.get('hidden_act')!r} (SwiGLU needs 'silu')")
    _reject(bool(config.get("attention_bias", False)), source, "attention_bias=true")
    _reject(bool(config.get("mlp_bias", False)), source, "mlp_bias=true")
    scaling = config.get("rope_scaling")
    _reject(scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default", source,
            f"rope_scaling={scaling!r}")
    return dict(
        vocab_size=int(_require(config, "vocab_size", source)),
        mask_id=None,
        d_model=d_model,
        num_layers=int(_require(config, "num_hidden_layers", source)),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or d_model // num_heads),
        mlp_dim=int(_require(config, "intermediate_size", source)),
        max_len=int(config.get("max_position_embeddings", 2048)),
        rope_theta=float(config.get("rope_theta", 10_000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_style="half",
        causality="causal",
    )


def _llada_config(config: dict, source: Path) -> dict:
    d_model = int(_require(config, "d_model", source))
    num_heads = int(_require(config, "n_heads", source))
    _reject(config.get("block_type", "llama") != "llama", source, f"block_type={config.get('block_type')!r}")
    _reject(config.get("activation_type", "silu") not in ("silu", "swiglu"), source,
            f"activation_type={config.get('activation_type')!r}")
    _reject(bool(config.get("include_bias", False)) or bool(config.get("include_qkv_bias", False)), source,
            "include_bias / include_qkv_bias=true")
    _reject(config.get("rope", True) is not True, source, "rope=false")
    vocab = int(config.get("embedding_size") or _require(config, "vocab_size", source))
    return dict(
        vocab_size=vocab,
        mask_id=int(config.get("mask_token_id", 126336)),
        d_model=d_model,
        num_layers=int(_require(config, "n_layers", source)),
        num_heads=num_heads,
        num_kv_heads=int(config.get("n_kv_heads") or num_heads),
        head_dim=d_model // num_heads,
        mlp_dim=int(_require(config, "mlp_hidden_size", source)),
        max_len=int(config.get("max_sequence_length", 4096)),
        rope_theta=float(config.get("rope_theta", 10_000.0)),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        rope_style="half",
        causality="bidirectional",
    )


_FAMILIES = {"llama": (_llama_config, HF_LLAMA), "llada": (_llada_config, HF_LLADA)}


def hf_config(directory: str | os.PathLike, **overrides) -> tuple[ModelConfig, Naming]:
    """The ModelConfig (with field overrides) and tensor naming of a checkpoint directory's config.json."""
    source = Path(directory) / "config.json"
    if not source.is_file():
        raise FileNotFoundError(f"config.json not found in {directory}")
    config = json.loads(source.read_text())
    model_type = config.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} (architectures {config.get('architectures')}) is not supported; "
            f"load_safetensors reads {SUPPORTED_MODEL_TYPES}"
        )
    build, naming = _FAMILIES[model_type]
    fields = dict(build(config, source), dtype="float32")
    fields.update(overrides)
    return ModelConfig(**fields), naming


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else ``model.safetensors``."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file.name} (listed in {index}) not found in {directory}")
    return files


def _stored_tensors(files: list[Path]) -> dict[str, StoredTensor]:
    def reader_of(file, name):
        def read():
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        return read

    tensors: dict[str, StoredTensor] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} is stored twice: in {tensors[name].file} and in {file}")
                shape = tuple(f.get_slice(name).get_shape())
                tensors[name] = StoredTensor(name, str(file), shape, reader_of(file, name))
    return tensors


def load_safetensors(directory: str | os.PathLike, *, progress: bool = True, **overrides) -> tuple[ModelConfig, DiffusionLM]:
    """Load a Hugging Face Llama or LLaDA checkpoint directory as (config, model).

    overrides: ModelConfig fields to change (``dtype="bfloat16"``, ``max_len``, ...).
    progress: a tqdm bar while the tensors are read.
    Raises FileNotFoundError naming a missing config.json or weight file, ValueError for
    another model_type, a missing field, or a tensor that is missing, unexpected or of the
    wrong shape; NotImplementedError for variants this model does not have (biases, rope scaling).
    """
    cfg, naming = hf_config(directory, **overrides)
    tensors = _stored_tensors(weight_files(directory))
    # rotary inverse frequencies (older Llama exports) are recomputed; a tied head may be saved as a copy
    ignored = [n for n in tensors if n.endswith(".rotary_emb.inv_freq")]
    if cfg.tie_embeddings:
        ignored.append(naming.head)
    model = assemble(cfg, naming, tensors, source=str(directory), ignored=ignored, progress=progress)
    return cfg, model
