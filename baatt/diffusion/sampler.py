"""Iterative unmasking sampler for masked-diffusion LMs (LLaDA).

The canvas holds the prompt and the mask token at every position to generate.
Positions to generate are split, in positional order, into blocks of
``block_length`` (semi-autoregressive block decoding); each block gets
``steps / num_blocks`` denoising steps and only its positions may be unmasked
while it is current. At each step the model predicts every masked position
(greedy argmax at ``temperature=0``, sampling from ``softmax(logits/T)``
otherwise); the ``n`` most confident predictions of the current block are
committed and the rest stay masked ("low-confidence remasking"; ``"random"``
commits random ones). ``n`` follows a linear schedule: a block of ``m``
positions over ``s`` steps commits ``m // s`` (+1 for the first ``m % s``
steps). Prompt tokens are never changed; every generated position is
committed exactly once.

Sparse attention options:
  dense_warmup: the first ``dense_warmup`` steps run dense attention.
  reuse_every: with a BA-Att plan, estimate the block selection at one step
    and reuse it for the next ``reuse_every - 1`` steps (the estimator runs
    once; ``baatt.reference.block_sparse_attention`` runs on the reused
    selection). 1 = estimate at every step.
The result reports the density (fraction of block pairs computed) of every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baatt.nn.attention import AttentionPlan


@dataclasses.dataclass
class SampleResult:
    """tokens [B, L]; unmask_step [B, L] (-1 for prompt positions); per-step density and estimator use."""

    tokens: np.ndarray
    unmask_step: np.ndarray
    step_density: list[float]
    estimated: list[bool]

    @property
    def mean_density(self) -> float:
        return float(np.mean(self.step_density)) if self.step_density else 1.0


@functools.lru_cache(maxsize=64)
def _forward(graphdef, plan: AttentionPlan, mode: str):
    if mode == "plain":
        def f(state, x):
            logits = nnx.merge(graphdef, state)(x, attention=plan)
            return logits, None
    elif mode == "estimate":
        def f(state, x):
            logits, aux = nnx.merge(graphdef, state)(x, attention=plan, return_aux=True)
            dens = jnp.mean(jnp.stack([jnp.mean(d) for d in aux["density"]]))
            return logits, (aux["selections"], dens)
    else:
        def f(state, x, sels):
            logits, aux = nnx.merge(graphdef, state)(x, attention=plan, selections=sels, return_aux=True)
            dens = jnp.mean(jnp.stack([jnp.mean(d) for d in aux["density"]]))
            return logits, dens
    return jax.jit(f)


@functools.partial(jax.jit, static_argnames=("mask_id", "vocab_limit", "remasking", "greedy"))
def _commit(logits, x, candidate, n_commit, key, temperature, *, mask_id, vocab_limit, remasking, greedy):
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab < vocab_limit, logits, -jnp.inf)
    k1, k2 = jax.random.split(key)
    if greedy:
        x0 = jnp.argmax(logits, axis=-1)
    else:
        x0 = jax.random.categorical(k1, logits / temperature, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    if remasking == "random":
        conf = jax.random.uniform(k2, conf.shape)
    conf = jnp.where(candidate, conf, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
    commit = candidate & (rank < n_commit[:, None])
    return jnp.where(commit, x0, x).astype(x.dtype), commit


def schedule(num_gen: int, steps: int, block_length: int) -> tuple[int, np.ndarray]:
    """(steps per block, commits per step [steps]) for ``num_gen`` positions to generate."""
    if num_gen < 1:
        raise ValueError(f"the canvas must contain at least one mask token to generate; got {num_gen}")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1; got {block_length}")
    num_blocks = -(-num_gen // block_length)
    if steps < num_blocks or steps % num_blocks:
        raise ValueError(
            f"steps must be a positive multiple of the number of blocks ({num_blocks} = ceil({num_gen} / block_length "
            f"{block_length})); got {steps}"
        )
    spb = steps // num_blocks
    counts = []
    for blk in range(num_blocks):
        m = min(block_length, num_gen - blk * block_length)
        counts += [m // spb + (1 if i < m % spb else 0) for i in range(spb)]
    return spb, np.asarray(counts, np.int32)


def generate(
    model,
    canvas,
    *,
    steps: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    plan: AttentionPlan | None = None,
    reuse_every: int = 1,
    dense_warmup: int = 0,
    key=None,
    mask_id: int | None = None,
    vocab_limit: int | None = None,
) -> SampleResult:
    """Fill every mask token of ``canvas`` [B, L] (int) by iterative unmasking.

    Args:
      model: a ``baatt.nn.DiffusionLM``.
      steps: total denoising steps (a multiple of the number of blocks).
      block_length: positions per semi-autoregressive block (default: all at once).
      temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
      remasking: "low_confidence" or "random".
      plan: attention plan (default: the model's own).
      reuse_every / dense_warmup: see the module docstring.
      vocab_limit: ids >= this are never generated (default: the mask id, so
        neither the mask token nor padding rows of the vocabulary).
    """
    mask_id = model.cfg.mask_id if mask_id is None else mask_id
    vocab_limit = mask_id if vocab_limit is None else vocab_limit
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random'; got {remasking!r}")
    if not isinstance(reuse_every, int) or reuse_every < 1:
        raise ValueError(f"reuse_every must be an int >= 1; got {reuse_every!r}")
    if not isinstance(dense_warmup, int) or dense_warmup < 0:
        raise ValueError(f"dense_warmup must be an int >= 0; got {dense_warmup!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    x = np.asarray(canvas)
    if x.ndim != 2:
        raise ValueError(f"canvas must have shape [batch, length]; got {x.shape}")
    gen = x == mask_id
    per_row = gen.sum(axis=1)
    if np.any(per_row != per_row[0]):
        raise ValueError(f"every row of the canvas must hold the same number of mask tokens; got {per_row.tolist()}")
    num_gen = int(per_row[0])
    block_length = num_gen if block_length is None else block_length
    spb, counts = schedule(num_gen, steps, block_length)
    block_of = np.where(gen, (np.cumsum(gen, axis=1) - 1) // block_length, -1)

    plan = model.attention if plan is None else plan
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(0) if key is None else key
    x = jnp.asarray(x, jnp.int32)
    unmask_step = np.full(x.shape, -1, np.int32)
    sels = None
    densities, estimated = [], []
    for step in range(steps):
        if step < dense_warmup or plan.kind == "dense":
            logits, _ = _forward(graphdef, AttentionPlan.dense(), "plain")(state, x)
            densities.append(1.0)
            estimated.append(False)
        elif sels is None or (step - dense_warmup) % reuse_every == 0:
            logits, (sels, dens) = _forward(graphdef, plan, "estimate")(state, x)
            densities.append(float(dens))
            estimated.append(True)
        else:
            logits, dens = _forward(graphdef, plan, "reuse")(state, x, sels)
            densities.append(float(dens))
            estimated.append(False)
        still = np.asarray(x) == mask_id
        candidate = jnp.asarray(still & (block_of == step // spb))
        n_commit = jnp.full((x.shape[0],), counts[step], jnp.int32)
        key, sub = jax.random.split(key)
        x, commit = _commit(logits, x, candidate, n_commit, sub, jnp.float32(max(temperature, 1e-6)),
                            mask_id=mask_id, vocab_limit=vocab_limit, remasking=remasking, greedy=temperature == 0)
        unmask_step[np.asarray(commit)] = step
    return SampleResult(np.asarray(x), unmask_step, densities, estimated)
