"""Flax NNX Llama-family LM (masked diffusion or causal) with pluggable (dense or BA-Att) attention, and loaders."""

from baatt.nn.attention import AttentionPlan, ba_attention_fn, dense_attention, run_layer_attention
from baatt.nn.capture import capture_path, capture_qkv
from baatt.nn.config import PRESETS, ModelConfig, get_config
from baatt.nn.loaders import load_gguf, load_safetensors, load_smollm2, smollm2_path
from baatt.nn.model import DiffusionLM, apply_rope, count_params, rope_tables

__all__ = [
    "AttentionPlan",
    "DiffusionLM",
    "ModelConfig",
    "PRESETS",
    "apply_rope",
    "ba_attention_fn",
    "capture_path",
    "capture_qkv",
    "count_params",
    "dense_attention",
    "get_config",
    "load_gguf",
    "load_safetensors",
    "load_smollm2",
    "rope_tables",
    "run_layer_attention",
    "smollm2_path",
]
