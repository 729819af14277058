"""Llama-family transformer (Flax NNX) with pluggable attention: a masked-diffusion LM or a causal LM.

Token embedding -> N x [RMSNorm -> (optional short convolution) -> GQA attention with
rotary embeddings -> residual; RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
tied or untied head. ``ModelConfig.causality`` sets who sees whom: by default every
token sees every token (LLaDA-style masked diffusion); "causal" is a Llama LM (the
checkpoints of ``baatt.nn.loaders``), "block_causal" a block-wise diffusion LM.
Attention per layer comes from an :class:`AttentionPlan`, given at
construction (default) or per call (``attention=``), so one set of weights can
be evaluated under dense attention and under any BA-Att configuration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from baatt.nn.attention import AttentionPlan, run_layer_attention
from baatt.nn.config import ModelConfig


def rope_tables(length: int, head_dim: int, theta: float):
    """cos, sin [length, head_dim/2] in float32."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin, style: str = "half"):
    """Rotary embedding on x [B, L, H, D]; pair j turns by the angle of frequency j (``rope_tables``).

    style "half": pair j is dimensions (j, j + D/2); "interleaved": dimensions (2j, 2j + 1).
    """
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    xf = x.astype(jnp.float32)
    if style == "half":
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    if style == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape).astype(x.dtype)
    raise ValueError(f"rope style must be 'half' or 'interleaved'; got {style!r}")


def embed_tokens(table, tokens, dtype):
    """Rows of ``table`` (float32 [vocab, d]) at ``tokens``, cast to ``dtype``.

    The values of ``nnx.Embed`` with that dtype (which casts the whole table first), but the
    gradient is accumulated in the table's float32: the backward of a gather is a scatter-add
    into the table, and in bfloat16 it sums thousands of contributions to rows that many
    positions share (the mask token's row takes about half of a training batch) with 8-bit
    mantissas; XLA also lowers a bfloat16 scatter-add as a compare-and-swap loop.
    """
    return jnp.take(table, tokens, axis=0).astype(dtype)


def _linear(cfg: ModelConfig, din, dout, rngs, std=None):
    init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
    return nnx.Linear(din, dout, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                      kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
        self.q_proj = _linear(cfg, cfg.d_model, cfg.num_heads * cfg.head_dim, rngs)
        self.k_proj = _linear(cfg, cfg.d_model, cfg.num_kv_heads * cfg.head_dim, rngs)
        self.v_proj = _linear(cfg, cfg.d_model, cfg.num_kv_heads * cfg.head_dim, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * cfg.head_dim, cfg.d_model, rngs, std=out_std)

    def project(self, x, cos, sin):
        """Queries [B, L, Hq, D], keys and values [B, L, Hkv, D] of the normed input x, rotary embeddings applied."""
        cfg = self.cfg
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, cos, sin, cfg.rope_style), apply_rope(k, cos, sin, cfg.rope_style), v

    def __call__(self, x, cos, sin, *, plan, layer, key_mask=None, selection=None, query_positions=None,
                 capture=False):
        """(output [B, L, d_model], info); with ``capture``, info also holds the layer's q, k, v (as ``project``)."""
        cfg = self.cfg
        q, k, v = self.project(x, cos, sin)
        out, info = run_layer_attention(plan, layer, cfg.num_layers, q, k, v, key_mask=key_mask, selection=selection,
                                        query_positions=query_positions, causality=cfg.causality,
                                        causal_block_size=cfg.causal_block_size)
        if capture:
            info = dict(info, q=q, k=k, v=v)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1)), info


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        out_std = 0.02 / (2 * cfg.num_layers) ** 0.5
        self.gate = _linear(cfg, cfg.d_model, cfg.mlp_dim, rngs)
        self.up = _linear(cfg, cfg.d_model, cfg.mlp_dim, rngs)
        self.down = _linear(cfg, cfg.mlp_dim, cfg.d_model, rngs, std=out_std)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
    """x + depthwise convolution of x over each token and its ``width - 1`` predecessors.

    Weights [width, d] start at zero (the identity). Positions where ``key_mask`` is False are
    zeroed first, so padding never leaks into real tokens.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        del rngs  # zero-initialised
        self.width = cfg.short_conv
        self.weight = nnx.Param(jnp.zeros((cfg.short_conv, cfg.d_model), cfg.weight_dtype))

    def __call__(self, x, key_mask=None):
        src = x if key_mask is None else jnp.where(key_mask[..., None], x, 0)
        length = x.shape[1]
        padded = jnp.pad(src, ((0, 0), (self.width - 1, 0), (0, 0)))
        w = self.weight[...].astype(x.dtype)
        # term j: the token j places back (padded[:, width-1-j : width-1-j+L])
        mixed = sum(w[j] * padded[:, self.width - 1 - j: self.width - 1 - j + length] for j in range(self.width))
        return x + mixed.astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # Norms compute in float32 (the projections after them cast to the compute dtype): the scale's
        # gradient is a sum over every token, which a bfloat16 norm would accumulate in bfloat16.
        kw = dict(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(cfg.d_model, **kw)
        self.conv = ShortConv(cfg, rngs=rngs) if cfg.short_conv else None
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, **kw):
        a = self.attn_norm(x)
        if self.conv is not None:
            a = self.conv(a, kw.get("key_mask"))
        h, info = self.attn(a, cos, sin, **kw)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), info


class DiffusionLM(nnx.Module):
    """Masked-diffusion LM; with ``ModelConfig.causality="causal"``, a causal LM (e.g. a loaded Llama).

    ``model(tokens)`` -> logits [B, L, vocab] (compute dtype). Options:
      key_mask: bool [B, L] (True = real token) for padded batches.
      attention: an AttentionPlan for this call (default: the one given at construction).
      selections: per-layer ``BlockSelection`` (or None) to reuse instead of estimating.
      query_positions: int [B or 1, m]: the queries the BA-Att layers' selectors estimate from
        (``baatt.attention(query_positions=...)``; selectors with ``Selector.query_positions``).
      return_aux: also return {"selections": [...], "density": [...]} per layer.

    ``model.hidden(tokens, ...)`` (same options) -> final hidden states [B, L, d]
    after ``final_norm``, without the head; ``model.logits(h)`` applies the head
    (tied embedding or untied ``head``, plus ``out_bias``) to hidden vectors of
    any leading shape. ``model(tokens) == model.logits(model.hidden(tokens))``;
    the split lets a loss apply the head at a subset of positions only.
    """

    def __init__(self, cfg: ModelConfig, *, attention: AttentionPlan | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = AttentionPlan.dense() if attention is None else attention
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32,
                                      param_dtype=cfg.weight_dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else _linear(cfg, cfg.d_model, cfg.vocab_size, rngs, std=0.02)
        self.out_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.weight_dtype)) if cfg.output_bias else None

    def set_output_bias(self, counts, *, smoothing: float = 0.1) -> None:
        """Set the output bias to the log unigram of ``counts`` [vocab] (token counts of the training data).

        Started at the unigram, the loss begins at the unigram level and the
        gradient goes to context use at once; a zero bias must be learnt at
        ~lr per Adam step (thousands of steps to reach log-probabilities of -10).
        """
        if self.out_bias is None:
            raise ValueError("set_output_bias needs ModelConfig.output_bias=True")
        c = jnp.asarray(counts, jnp.float32)
        if c.shape != (self.cfg.vocab_size,):
            raise ValueError(f"counts must have shape ({self.cfg.vocab_size},); got {c.shape}")
        if self.cfg.mask_id is not None:
            c = c.at[self.cfg.mask_id].set(0.0)
        c = c + smoothing
        self.out_bias[...] = jnp.log(c / jnp.sum(c)).astype(self.cfg.weight_dtype)

    def __call__(self, tokens, *, key_mask=None, attention: AttentionPlan | None = None, selections=None,
                 query_positions=None, return_aux: bool = False):
        out = self.hidden(tokens, key_mask=key_mask, attention=attention, selections=selections,
                          query_positions=query_positions, return_aux=return_aux)
        if not return_aux:
            return self.logits(out)
        return self.logits(out[0]), out[1]

    def logits(self, h):
        """Output head on hidden vectors h [..., d_model] (after ``final_norm``) -> logits [..., vocab]."""
        if h.shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden vectors must have last dimension d_model={self.cfg.d_model}; got {h.shape}")
        out = self.embed.attend(h) if self.head is None else self.head(h)
        if self.out_bias is not None:
            # added in float32 so that its gradient (a sum over every position) accumulates in float32
            out = (out.astype(jnp.float32) + self.out_bias[...].astype(jnp.float32)).astype(out.dtype)
        return out

    def embed_inputs(self, tokens):
        """(token embeddings [B, L, d_model], rotary cos, sin [L, head_dim/2]): what the first block takes."""
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, length]; got {tokens.shape}")
        length = tokens.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length must be at most ModelConfig.max_len={cfg.max_len}; got {length}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids; got dtype {tokens.dtype}")
        cos, sin = rope_tables(length, cfg.head_dim, cfg.rope_theta)
        return embed_tokens(self.embed.embedding[...], tokens, cfg.compute_dtype), cos, sin

    def hidden(self, tokens, *, key_mask=None, attention: AttentionPlan | None = None, selections=None,
               query_positions=None, return_aux: bool = False):
        """Final hidden states [B, L, d_model] (after ``final_norm``, before the head); options as ``__call__``.

        With ``ModelConfig.shift_logits``, entry i is the state that predicts token i: position i - 1's.
        """
        cfg = self.cfg
        plan = self.attention if attention is None else attention
        if selections is not None and len(selections) != cfg.num_layers:
            raise ValueError(f"selections must hold one entry per layer ({cfg.num_layers}); got {len(selections)}")
        x, cos, sin = self.embed_inputs(tokens)
        x, infos = self.run_blocks(x, cos, sin, plan=plan, key_mask=key_mask, selections=selections,
                                   query_positions=query_positions)
        x = self.final_norm(x)
        if cfg.shift_logits:  # position i's prediction comes from position i - 1 (ModelConfig.shift_logits)
            x = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
        if not return_aux:
            return x
        return x, dict(selections=[i["selection"] for i in infos], density=[i["density"] for i in infos])

    def run_blocks(self, x, cos, sin, *, plan: AttentionPlan, key_mask=None, selections=None, query_positions=None):
        """The blocks in order on embedded inputs x [B, L, d_model]: (output, one info dict per layer).

        Each info holds the layer's ``selection`` (None for dense layers) and ``density`` [B, Hq].
        """
        infos = []
        for i, block in enumerate(self.blocks):
            sel = None if selections is None else selections[i]
            x, info = block(x, cos, sin, plan=plan, layer=i, key_mask=key_mask, selection=sel,
                            query_positions=query_positions)
            infos.append(info)
        return x, infos


def count_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
