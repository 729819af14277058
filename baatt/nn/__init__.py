"""Flax NNX masked-diffusion LM with pluggable (dense or BA-Att) attention."""

from baatt.nn.attention import AttentionPlan, ba_attention_fn, dense_attention, run_layer_attention
from baatt.nn.config import PRESETS, ModelConfig, get_config
from baatt.nn.model import DiffusionLM, apply_rope, count_params, rope_tables

__all__ = [
    "AttentionPlan",
    "DiffusionLM",
    "ModelConfig",
    "PRESETS",
    "apply_rope",
    "ba_attention_fn",
    "count_params",
    "dense_attention",
    "get_config",
    "rope_tables",
    "run_layer_attention",
]
