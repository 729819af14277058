"""A pretrained causal LM turned into a masked-diffusion LM: the DiffuLLaMA / Dream recipe, for SmolLM2-135M.

Rather than training a diffusion LM from scratch, continue training a causal one
(Gong et al., "Scaling Diffusion Language Models via Adaptation from Autoregressive
Models", arXiv 2410.17891; Ye et al., "Dream 7B", 2025). :func:`adapt_for_diffusion`
makes the model changes, :data:`PRESETS` holds the training runs, ``baatt.train.train``
does the training:

1. attention turns bidirectional (``ModelConfig.causality="bidirectional"``);
2. a mask token joins the vocabulary as the first id after it: one embedding row is
   appended (the tied head grows with it), initialised to the mean embedding, an input
   inside the distribution the layers were trained on that favours no output token; the
   table is padded with zero rows to a multiple of 64 (aligned matrix shapes for the
   head). Decoders never produce ids from the mask on;
3. shifted logits (``ModelConfig.shift_logits``): token i is predicted from position
   i - 1, the alignment the pretrained head already has;
4. continued training with the masked-diffusion loss on the offline corpus, tokenized with
   the model's own tokenizer (:func:`token_streams`), with part of the rows passkey and
   multi-key NIAH examples whose answer is masked, so that the model learns to fill an
   answer from far context.

The adapted model is a :class:`ScannedDiffusionLM`: the same parameters and outputs as
``DiffusionLM``, with the blocks run as a ``jax.lax.scan`` over runs of layers that the
attention plan treats alike. SmolLM2 has 30 layers; unrolled, each training stage and
each (selector, sparsity, length) of an evaluation compiles 30 copies of the block.

On a GPU the run (``python -m experiments.adapt_smollm2``) trains and evaluates in one
process: a checkpoint of the 135M model with its optimizer state is ~1.6 GB, far more
than a run can hand back, so the weights live only where they were trained.
docs/dlm.md ("SmolLM2 diffusion LM") gives the commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baatt.data import corpus
from baatt.nn.attention import AttentionPlan
from baatt.nn.model import DiffusionLM
from baatt.train import TrainConfig

# The vocabulary (with the mask token) is padded to a multiple of this many rows.
VOCAB_MULTIPLE = 64
# The document separator of the token streams: SmolLM2's (and GPT-2's) end-of-text token.
DOCUMENT_SEPARATOR = "<|endoftext|>"


# ----------------------------------------------------------------------------- the model


def layer_runs(plan: AttentionPlan, num_layers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of consecutive layers that ``plan`` configures alike, in order.

    A dense plan is one run; BA-Att with compensation in the first and last layers is three.
    """
    configs = [plan.layer_config(i, num_layers) for i in range(num_layers)]
    runs, start = [], 0
    for i in range(1, num_layers + 1):
        if i == num_layers or configs[i] != configs[start]:
            runs.append((start, i))
            start = i
    return runs


class ScannedDiffusionLM(DiffusionLM):
    """``DiffusionLM`` whose blocks run as one ``jax.lax.scan`` per run of alike layers (:func:`layer_runs`).

    Same parameters (a checkpoint of one loads into the other), same outputs and options; the
    compiled program holds one block per run instead of one per layer. The per-layer weights
    are stacked inside the traced function: a copy of the block weights per call, negligible
    next to a forward pass. Calls with ``selections`` (a reused selection per layer, as the
    sampler's ``reuse_every`` passes) run the layers one by one.
    """

    def run_blocks(self, x, cos, sin, *, plan: AttentionPlan, key_mask=None, selections=None, query_positions=None):
        if selections is not None:
            return super().run_blocks(x, cos, sin, plan=plan, key_mask=key_mask, selections=selections,
                                      query_positions=query_positions)
        block_def = nnx.graphdef(self.blocks[0])
        infos = []
        for start, stop in layer_runs(plan, self.cfg.num_layers):
            layers = [nnx.state(self.blocks[i]) for i in range(start, stop)]
            stacked = jax.tree.map(lambda *arrays: jnp.stack(arrays), *layers)

            def body(h, layer_state, layer=start):  # every layer of the run has the configuration of its first
                return nnx.merge(block_def, layer_state)(h, cos, sin, plan=plan, layer=layer, key_mask=key_mask,
                                                         query_positions=query_positions)

            x, run_infos = jax.lax.scan(body, x, stacked)
            infos += [jax.tree.map(lambda a, j=j: a[j], run_infos) for j in range(stop - start)]
        return x, infos


def scanned(model: DiffusionLM) -> ScannedDiffusionLM:
    """``model``'s configuration and weights as a :class:`ScannedDiffusionLM` (shares the arrays)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ScannedDiffusionLM(model.cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def adapt_for_diffusion(model: DiffusionLM, *, shift_logits: bool = True, **overrides) -> ScannedDiffusionLM:
    """The masked-diffusion form of a causal LM's weights (steps 1-3 of the module docstring).

    model: a causal ``DiffusionLM`` without a mask token (e.g. from ``baatt.nn.load_gguf``).
    shift_logits: see ``ModelConfig.shift_logits``; on SmolLM2 before any training, held-out
      masked-token NLL at 15% / 50% masked is 7.17 / 8.47 nats with the shift and 8.62 / 8.98
      without (2 x 512 tokens). overrides: ModelConfig fields to set besides or instead of the
      recipe's (e.g. ``dtype="bfloat16"``).
    Returns a :class:`ScannedDiffusionLM` with ``mask_id`` = the old vocabulary size: its embedding
    row is the mean embedding (with an untied head, its output column zero), the padding rows
    zero, an output bias extended with zeros.
    """
    cfg = model.cfg
    if cfg.mask_id is not None:
        raise ValueError(f"model must not have a mask token yet (ModelConfig.mask_id=None); got mask_id={cfg.mask_id}")
    vocab = cfg.vocab_size
    padded = -(-(vocab + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    recipe = dict(vocab_size=padded, mask_id=vocab, causality="bidirectional", causal_block_size=None,
                  shift_logits=shift_logits)
    new_cfg = cfg.replace(**{**recipe, **overrides})
    params = nnx.to_pure_dict(nnx.state(model))
    extra = padded - vocab

    def grow(array, axis, first_new_row=None):
        """``array`` with ``extra`` new entries along ``axis``: ``first_new_row`` (the mask's) then zeros."""
        array = jnp.asarray(array, jnp.float32)
        shape = list(array.shape)
        shape[axis] = extra
        new = jnp.zeros(shape, jnp.float32)
        if first_new_row is not None:
            new = new.at[(slice(None),) * axis + (0,)].set(first_new_row)
        return jnp.concatenate([array, new], axis=axis).astype(new_cfg.weight_dtype)

    table = params["embed"]["embedding"]
    params["embed"]["embedding"] = grow(table, 0, jnp.mean(jnp.asarray(table, jnp.float32), axis=0))
    if not cfg.tie_embeddings:
        params["head"]["kernel"] = grow(params["head"]["kernel"], 1)
    if cfg.output_bias:
        params["out_bias"] = grow(params["out_bias"], 0)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ScannedDiffusionLM(new_cfg, rngs=nnx.Rngs(0))))
    # copies: training donates its weights, which must not take the causal model's arrays with them
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.array(a, new_cfg.weight_dtype), params))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    """The offline corpus in one tokenizer's ids: ``doc0 <sep> doc1 <sep> ...`` per split.

    val_text_bytes / val_documents: UTF-8 bytes and number of the validation documents, so that
    an NLL per token converts to one per byte (comparable across tokenizers).
    """

    train: np.ndarray
    val: np.ndarray
    val_text_bytes: int
    val_documents: int

    @property
    def val_bytes_per_token(self) -> float:
        """Text bytes per token of the validation split (separators not counted)."""
        return self.val_text_bytes / max(self.val.size - self.val_documents, 1)


def separator_id(tokenizer) -> int:
    """The id of ``DOCUMENT_SEPARATOR`` in ``tokenizer`` (one control token)."""
    ids = tokenizer.encode(DOCUMENT_SEPARATOR)
    if len(ids) != 1:
        raise ValueError(f"tokenizer must have {DOCUMENT_SEPARATOR!r} as one token (documents are joined with it); "
                         f"it encodes to {ids}")
    return ids[0]


def token_streams(tokenizer, *, cache_dir: str | os.PathLike | None = None,
                  max_documents: int | None = None) -> TokenStreams:
    """The corpus of ``baatt.data.corpus`` (train / val documents) in ``tokenizer``'s ids.

    cache_dir: where the streams are kept (``train.npy``, ``val.npy``, ``stats.json``): read when
      there, else built (about a minute for SmolLM2) and written. None: built, not kept.
    max_documents: only the first that many documents of each split (smoke runs, tests).
    """
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None and (cache / "stats.json").is_file():
        stats = json.loads((cache / "stats.json").read_text())
        train_ids, val_ids = (np.load(cache / f"{split}.npy", mmap_mode="r") for split in ("train", "val"))
        return TokenStreams(train=train_ids, val=val_ids, val_text_bytes=stats["val_text_bytes"],
                            val_documents=stats["val_documents"])
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be None or >= 1; got {max_documents}")
    sep = separator_id(tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    docs = {split: d[:max_documents] for split, d in corpus.split_documents().items()}
    streams = {}
    for split, texts in docs.items():
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text))
            ids.append(sep)
        streams[split] = np.asarray(ids, dtype)
    val_bytes = sum(len(text.encode("utf-8")) for text in docs["val"])
    result = TokenStreams(train=streams["train"], val=streams["val"], val_text_bytes=val_bytes,
                          val_documents=len(docs["val"]))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            np.save(cache / f"{split}.npy", streams[split])
        stats = dict(val_text_bytes=result.val_text_bytes, val_documents=result.val_documents,
                     tokens={s: int(a.size) for s, a in streams.items()}, tokenizer=Path(tokenizer.path).name)
        (cache / "stats.json").write_text(json.dumps(stats, indent=1))  # written last: marks the cache complete
    return result


def smollm2_token_dir() -> Path:
    """Where SmolLM2's token streams are cached: ``<data dir>/tokens/smollm2``."""
    return corpus.token_cache_dir() / "smollm2"


# ----------------------------------------------------------------------------- training runs

_SMOLLM2_DLM = TrainConfig(
    model="smollm2_dlm",  # a name for the records: train() gets the adapted model itself
    # 2K rows first (cheaper steps while the model turns bidirectional), then 4K: passkey and NIAH are
    # evaluated at 2K-8K. 16 x 2K = 8 x 4K = 32K tokens a step.
    stages=((0.7, 2048, 16), (1.0, 4096, 8)),
    steps=100_000,
    time_budget_s=240.0,  # wall clock, compilation included; leaves ~3 min of a 10 min run to the evaluation
    # Continued training: a tenth of the from-scratch presets' rate, short warmup, light weight decay
    # (it pulls pretrained weights towards zero).
    peak_lr=2e-4,
    warmup_steps=50,
    weight_decay=0.01,
    task_fraction=0.5,
    task_kinds=("passkey", "multikey_niah"),
    eval_every=0,  # the final evaluation only (masked NLL and one-shot passkey at eval_len)
    eval_batches=1,
    eval_tasks=16,
    eval_len=2048,
    # the head at a quarter of the positions, masked ones first: the [B, L, 49K] logits of every
    # position would be 6 GB in float32 and most of them are not scored
    head_positions=0.25,
    ckpt_every=500,
    batch_workers=0,  # worker processes rebuild GPT-2's tokenizer only; a 2K batch takes milliseconds
)

PRESETS: dict[str, TrainConfig] = {
    # One GPU: 240 s of training, then the evaluation of experiments/adapt_smollm2.py in the same run.
    "smollm2_dlm": _SMOLLM2_DLM,
    # CPU smoke runs and tests: a few steps on 512-token rows of a tiny model.
    "cpu_smoke": dataclasses.replace(
        _SMOLLM2_DLM, stages=((1.0, 512, 2),), steps=3, time_budget_s=None, warmup_steps=1, peak_lr=1e-3,
        eval_tasks=2, eval_len=512, head_positions=None, ckpt_every=1000, progress=False),
}
