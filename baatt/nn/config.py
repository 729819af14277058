"""Frozen configuration of the masked-diffusion LM, with named presets."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

ROPE_STYLES = ("half", "interleaved")
CAUSALITIES = ("bidirectional", "causal", "block_causal")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama-family transformer: bidirectional (LLaDA-style masked diffusion, the default) or causal.

    vocab_size: embedding rows (GPT-2 BPE 50257 + mask, padded to a multiple of 64).
    mask_id: id of the mask token; None for a model without one (a causal LM).
    max_len: longest sequence the model accepts.
    num_kv_heads: GQA key/value heads (divides num_heads).
    tie_embeddings: share the token embedding with the output head.
    output_bias: a learnt per-token bias on the logits (see ``DiffusionLM.set_output_bias``):
      without it a tied, RMS-normed model must learn the unigram through the
      embedding itself, which stalls training at the unigram loss.
    short_conv: 0 = off; w >= 2 = before each attention, the normed input gets a learnt depthwise
      convolution over the token and its w - 1 predecessors added (zero-initialised, so the model
      starts as without it). Each position then carries its neighbours' tokens into its query and
      key, so one attention layer can match "the token k places after X" (how an answer slot finds
      the k-th token of a key) without first composing a previous-token head.
    rope_style: which dimensions of a head rotary embeddings rotate together. "half": pairs
      (i, i + head_dim/2) (Hugging Face Llama, LLaDA); "interleaved": adjacent pairs (2i, 2i + 1)
      (GGUF files: llama.cpp permutes the rows of the Q and K projections so that its adjacent-pair
      rotation computes the same attention as "half" on the original weights).
    causality: "bidirectional" (every token sees every token), "causal" (a token sees itself and
      its predecessors) or "block_causal" (a token sees its own block of ``causal_block_size``
      tokens and every earlier block: semi-autoregressive, block-wise diffusion decoding).
    causal_block_size: block length of "block_causal"; must be None for the other kinds.
    shift_logits: the state that predicts token i is the final state of position i - 1 (position 0
      keeps its own), as in Dream and DiffuLLaMA. A causal LM's head was trained to predict the
      *next* token from each position; a masked-diffusion model adapted from one keeps that
      alignment instead of first relearning to predict a token from its own position, so the
      pretrained head is right from the first step wherever the preceding tokens are visible.
      ``DiffusionLM.hidden`` applies the shift, so every loss and decoder reads it unchanged.
    dtype: compute dtype (bf16 on GPU); param_dtype: storage dtype of the weights.
    """

    vocab_size: int = 50304
    mask_id: int | None = 50257
    d_model: int = 384
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 1024
    max_len: int = 8192
    rope_theta: float = 100_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    output_bias: bool = False
    short_conv: int = 0
    rope_style: str = "half"
    causality: str = "bidirectional"
    causal_block_size: int | None = None
    shift_logits: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int; got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads must divide num_heads (GQA); got {self.num_kv_heads} and {self.num_heads}"
            )
        sc = self.short_conv
        if isinstance(sc, bool) or not isinstance(sc, int) or sc < 0 or sc == 1:
            raise ValueError(f"ModelConfig.short_conv must be 0 (off) or an int >= 2 (window in tokens); got {sc!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (rotary embeddings); got {self.head_dim}")
        if self.mask_id is not None and not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(
                f"ModelConfig.mask_id must be None or lie in [0, vocab_size={self.vocab_size}); got {self.mask_id}"
            )
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"ModelConfig.rope_style must be one of {ROPE_STYLES}; got {self.rope_style!r}")
        if self.causality not in CAUSALITIES:
            raise ValueError(f"ModelConfig.causality must be one of {CAUSALITIES}; got {self.causality!r}")
        block = self.causal_block_size
        if self.causality == "block_causal":
            if isinstance(block, bool) or not isinstance(block, int) or block < 1:
                raise ValueError(
                    f"ModelConfig.causal_block_size must be a positive int when causality='block_causal'; got {block!r}"
                )
        elif block is not None:
            raise ValueError(
                f"ModelConfig.causal_block_size applies to causality='block_causal' only (must be None for "
                f"{self.causality!r}); got {block!r}"
            )
        if not isinstance(self.shift_logits, bool):
            raise ValueError(f"ModelConfig.shift_logits must be a bool; got {self.shift_logits!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelConfig.{name} must be 'float32', 'bfloat16' or 'float16'; got {getattr(self, name)!r}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests: a few hundred thousand parameters besides the embedding.
    "tiny": ModelConfig(
        vocab_size=50304, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, max_len=1024, dtype="float32",
    ),
    # One H100, minutes: ~32M parameters (19.3M of them the tied embedding).
    "small": ModelConfig(),
    # SmolLM2-135M's transformer (30 layers, d 576, 9 / 3 heads of 64, MLP 1536) with this package's GPT-2
    # vocabulary: times the adapted SmolLM2 DLM's computation at random init, without its GGUF.
    "smollm2_shape": ModelConfig(
        d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536, norm_eps=1e-5,
        shift_logits=True,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named preset, with optional field overrides. Unknown name -> ValueError."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {tuple(PRESETS)}; got {name!r}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
