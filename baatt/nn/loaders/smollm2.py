"""SmolLM2-135M-Instruct, installed offline by ``bash scripts/setup_data.sh`` (GGUF, Q4_1).

Llama architecture: 30 layers, d_model 576, 9 query and 3 key/value heads of 64, SwiGLU 1536,
rotary theta 1e5, 8192 tokens of context, tied embeddings, vocabulary 49152 (byte-level BPE).
"""

from __future__ import annotations

from pathlib import Path

from baatt.data.gguf_file import open_gguf
from baatt.data.gguf_tokenizer import GGUFTokenizer
from baatt.data.tokenizer import SETUP_HINT, data_dir
from baatt.nn.config import ModelConfig
from baatt.nn.loaders.from_gguf import load_gguf
from baatt.nn.model import DiffusionLM

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Where setup_data.sh installs the SmolLM2 GGUF: ``<data dir>/models/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return data_dir() / "models" / SMOLLM2_FILE


def load_smollm2(*, progress: bool = True, **overrides) -> tuple[ModelConfig, DiffusionLM, GGUFTokenizer]:
    """(config, model, tokenizer) of SmolLM2-135M-Instruct; overrides as ``load_gguf``."""
    path = smollm2_path()
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {path}; {SETUP_HINT}")
    reader, _ = open_gguf(path)
    cfg, model = load_gguf(reader, progress=progress, **overrides)
    return cfg, model, GGUFTokenizer(reader)
