"""Pretrained checkpoints into ``DiffusionLM``: GGUF files (llama.cpp) and Hugging Face safetensors directories."""

from baatt.nn.loaders.from_gguf import gguf_config, load_gguf
from baatt.nn.loaders.from_safetensors import hf_config, load_safetensors, weight_files
from baatt.nn.loaders.smollm2 import load_smollm2, smollm2_path

__all__ = ["gguf_config", "hf_config", "load_gguf", "load_safetensors", "load_smollm2", "smollm2_path", "weight_files"]
