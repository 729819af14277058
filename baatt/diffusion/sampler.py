"""Iterative unmasking sampler for masked-diffusion LMs (LLaDA), with a sparse-attention recipe.

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

Sparse-attention recipe, for a BA-Att plan (each step is one of three kinds):

- ``"dense"``: the first ``dense_warmup`` steps run dense attention (an int: that
  many steps; a float in [0, 1): that fraction of the steps, rounded up). Early
  steps see a canvas of mask tokens, whose attention is least like the final one.
- ``"estimate"``: the first step after the warm-up runs the plan's sparse
  attention and keeps every layer's block selection.
- ``"reuse"``: later steps skip the estimator and run the kept selections through
  ``baatt.attention(..., selection=...)`` on the plan's implementation, until a
  refresh makes the next step an estimate again: every ``reuse_every``-th sparse
  step (1: estimate at every step; None: never), or, with ``refresh_drift=f``, the
  first step after some key block has had a share ``f`` of its tokens changed since
  the estimate (the estimator scores block means, and a block's mean moves with the
  share of its tokens that changed).

Which queries estimate: ``estimate_from="canvas"`` (default) leaves it to the selector (``last_query``
reads the last positions of the canvas, in generation the masked far end of the region to generate);
``estimate_from="block"`` gives it the positions of the block being decoded (the states that predict
them: one to the left under ``ModelConfig.shift_logits``), through ``baatt.attention(query_positions=...)``,
and a selection then serves one decoding block only: the first sparse step of every block estimates.
``block_context=k`` adds the ``k`` positions just before the block to those queries (for the first
block, the end of the prompt: where a question sits).

``prompt_sparsity`` / ``gen_sparsity`` give the keys of the prompt (the positions
before the first one to generate) and those of the generation budgets of their own:
every BA-Att layer then selects with the ``"prompt_gen"`` selector
(``baatt.diffusion.budgets``) around its own selector.

The result reports each step's kind and density (fraction of block pairs computed).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baatt.diffusion import budgets
from baatt.nn.attention import AttentionPlan
from baatt.selector_registry import SELECTORS, get_selector


@dataclasses.dataclass
class SampleResult:
    """The filled canvas and how it was made.

    tokens [B, L]; unmask_step [B, L]: the step that committed each position (-1 for the
    prompt); step_kind: "dense", "estimate" or "reuse" per step; step_density: fraction
    of block pairs computed per step (1 for dense steps); reference_logprob [B, L] or
    None: with ``generate(reference=...)``, the log-probability of the reference token
    at each generated position under the step that committed it (NaN for the prompt).
    """

    tokens: np.ndarray
    unmask_step: np.ndarray
    step_density: list[float]
    step_kind: list[str]
    reference_logprob: np.ndarray | None = None

    @property
    def estimated(self) -> list[bool]:
        """Whether each step ran the estimator."""
        return [kind == "estimate" for kind in self.step_kind]

    @property
    def mean_density(self) -> float:
        return float(np.mean(self.step_density)) if self.step_density else 1.0

    @property
    def reference_nll(self) -> float:
        """Mean negative log-probability of the reference tokens over the generated positions."""
        if self.reference_logprob is None:
            raise ValueError("reference_nll needs generate(..., reference=tokens)")
        return float(-np.nanmean(self.reference_logprob))


def _hidden(model, x, plan: AttentionPlan, kind: str, sels, query_positions=None):
    """(final hidden states, the selections made or None, mean density) of one step kind."""
    if kind == "dense":
        dense = plan if plan.kind == "dense" else AttentionPlan.dense()  # a dense plan keeps its implementation
        return model.hidden(x, attention=dense), None, jnp.float32(1.0)
    h, aux = model.hidden(x, attention=plan, selections=sels, return_aux=True,
                          query_positions=query_positions if kind == "estimate" else None)
    density = jnp.mean(jnp.stack([jnp.mean(d) for d in aux["density"]]))
    return h, aux["selections"] if kind == "estimate" else None, density


@functools.lru_cache(maxsize=64)
def _forward(graphdef, plan: AttentionPlan, mode: str):
    """Jitted logits at every position, for one step kind ("plain" for dense): "plain" -> (logits, None);
    "estimate" -> (logits, (selections, density)); "reuse" ((state, x, selections) -> (logits, density))."""
    kind = "dense" if mode == "plain" else mode

    def f(state, x, sels=None):
        model = nnx.merge(graphdef, state)
        h, made, density = _hidden(model, x, plan, kind, sels)
        return model.logits(h), {"dense": None, "estimate": (made, density), "reuse": density}[kind]

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _decode_forward(graphdef, plan: AttentionPlan, kind: str):
    """Jitted (state, x, positions [B, m], selections, query positions or None) -> (logits [B, m, V] at those
    positions, selections made or None, density): the output head only where a step may commit, not over the
    whole canvas."""

    def f(state, x, positions, sels, query_positions):
        model = nnx.merge(graphdef, state)
        h, made, density = _hidden(model, x, plan, kind, sels, query_positions)
        return model.logits(jnp.take_along_axis(h, positions[..., None], axis=1)), made, density

    return jax.jit(f)


@functools.partial(jax.jit, static_argnames=("mask_id", "vocab_limit", "remasking", "greedy"))
def _commit(logits, x, positions, n_commit, key, temperature, unmask_step, step, reference, reference_logprob, *,
            mask_id, vocab_limit, remasking, greedy):
    """Commit the ``n_commit`` most confident predictions among the masked ``positions`` [B, m] (logits
    [B, m, V] there). Returns the canvas, unmask steps and reference log-probabilities, updated."""
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab < vocab_limit, logits, -jnp.inf)
    k1, k2 = jax.random.split(key)
    if greedy:
        x0 = jnp.argmax(logits, axis=-1)
    else:
        x0 = jax.random.categorical(k1, logits / temperature, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0])
    if remasking == "random":
        conf = jax.random.uniform(k2, conf.shape)
    current = jnp.take_along_axis(x, positions, axis=1)
    candidate = current == mask_id
    conf = jnp.where(candidate, conf, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
    commit = candidate & (rank < n_commit)
    rows = jnp.arange(x.shape[0])[:, None]
    x = x.at[rows, positions].set(jnp.where(commit, x0, current).astype(x.dtype))
    unmask_step = unmask_step.at[rows, positions].set(jnp.where(commit, step, unmask_step[rows, positions]))
    if reference is not None:
        scored = jnp.take_along_axis(log_probs, jnp.take_along_axis(reference, positions, axis=1)[..., None],
                                     axis=-1)[..., 0]
        reference_logprob = reference_logprob.at[rows, positions].set(
            jnp.where(commit, scored, reference_logprob[rows, positions]))
    return x, unmask_step, reference_logprob


@functools.partial(jax.jit, static_argnames=("block",))
def _max_block_change(x, since, *, block: int):
    """Largest share of changed tokens in any block of ``block`` positions (the last one may be short)."""
    changed = (x != since).astype(jnp.float32)
    pad = -x.shape[1] % block
    sizes = jnp.pad(jnp.ones(x.shape[1]), (0, pad)).reshape(-1, block).sum(-1)
    return jnp.max(jnp.pad(changed, ((0, 0), (0, pad))).reshape(x.shape[0], -1, block).sum(-1) / sizes)


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


def _warmup_steps(dense_warmup: int | float, steps: int) -> int:
    """Dense steps of ``dense_warmup`` (a count, or a fraction of ``steps`` rounded up)."""
    if isinstance(dense_warmup, bool) or not isinstance(dense_warmup, (int, float)):
        raise ValueError(f"dense_warmup must be an int >= 0 or a float in [0, 1); got {dense_warmup!r}")
    if isinstance(dense_warmup, float):
        if not 0.0 <= dense_warmup < 1.0:
            raise ValueError(f"dense_warmup as a fraction of the steps must lie in [0, 1); got {dense_warmup}")
        return math.ceil(round(dense_warmup * steps, 9))
    if dense_warmup < 0:
        raise ValueError(f"dense_warmup must be an int >= 0 or a float in [0, 1); got {dense_warmup}")
    return dense_warmup


def _check_block_estimates(plan: AttentionPlan, num_layers: int) -> None:
    """``estimate_from="block"``'s rule: a BA-Att plan whose every BA-Att layer's selector takes query positions."""
    if plan.kind != "ba":
        raise ValueError("estimate_from='block' needs a BA-Att plan (AttentionPlan.ba); got a dense plan")
    for i in range(num_layers):
        cfg = plan.layer_config(i, num_layers)
        if cfg is not None and not get_selector(cfg.selector).query_positions:
            taking = tuple(name for name, sel in SELECTORS.items() if sel.query_positions)
            raise ValueError(f"estimate_from='block': layer {i}'s selector {cfg.selector!r} estimates from queries "
                             f"of its own choice; the selectors that take the block's positions are {taking}")


def _with_region_budgets(plan: AttentionPlan, num_layers: int, *, prompt_length: int, prompt_sparsity: float,
                        gen_sparsity: float) -> AttentionPlan:
    """``plan`` with every BA-Att layer selecting by ``prompt_gen`` around its own selector (dense layers stay)."""
    if plan.kind != "ba":
        raise ValueError("prompt_sparsity and gen_sparsity need a BA-Att plan (AttentionPlan.ba); got a dense plan")

    def split(cfg):
        if cfg is None:
            return None
        params = budgets.PromptGenParams(prompt_length=prompt_length, prompt_sparsity=prompt_sparsity,
                                         gen_sparsity=gen_sparsity, base=cfg.selector)
        return cfg.replace(selector=budgets.NAME, selector_params=params, sparsity=None, tau=None, peak_margin=None)

    layers = tuple(split(plan.layer_config(i, num_layers)) for i in range(num_layers))
    return dataclasses.replace(plan, config=None, compensate_layers=None, layer_configs=layers)


def generate(
    model,
    canvas,
    *,
    steps: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    plan: AttentionPlan | None = None,
    dense_warmup: int | float = 0,
    reuse_every: int | None = 1,
    refresh_drift: float | None = None,
    prompt_sparsity: float | None = None,
    gen_sparsity: float | None = None,
    estimate_from: str = "canvas",
    block_context: int = 0,
    reference=None,
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
      dense_warmup, reuse_every, refresh_drift, prompt_sparsity, gen_sparsity, estimate_from, block_context:
        the sparse-attention recipe (module docstring); the budgets go together.
      reference: int [B, L] tokens to score: ``SampleResult.reference_logprob`` holds
        their log-probability (softmax of the logits at temperature 1, ids below
        ``vocab_limit``) at each generated position, under the step that commits it.
      vocab_limit: ids >= this are never generated (default: the mask id, so
        neither the mask token nor padding rows of the vocabulary).
    """
    mask_id = model.cfg.mask_id if mask_id is None else mask_id
    vocab_limit = mask_id if vocab_limit is None else vocab_limit
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random'; got {remasking!r}")
    if reuse_every is not None and (isinstance(reuse_every, bool) or not isinstance(reuse_every, int)
                                    or reuse_every < 1):
        raise ValueError(f"reuse_every must be an int >= 1 or None (never re-estimate); got {reuse_every!r}")
    if refresh_drift is not None and not 0.0 < refresh_drift <= 1.0:
        raise ValueError(f"refresh_drift must be None or a share in (0, 1]; got {refresh_drift!r}")
    if (prompt_sparsity is None) != (gen_sparsity is None):
        raise ValueError(f"prompt_sparsity and gen_sparsity go together; got {prompt_sparsity!r} and {gen_sparsity!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if estimate_from not in ("canvas", "block"):
        raise ValueError(f"estimate_from must be 'canvas' or 'block'; got {estimate_from!r}")
    if isinstance(block_context, bool) or not isinstance(block_context, int) or block_context < 0:
        raise ValueError(f"block_context must be an int >= 0; got {block_context!r}")
    if block_context and estimate_from != "block":
        raise ValueError(f"block_context adds queries to the block's estimate: it needs estimate_from='block'; "
                         f"got estimate_from={estimate_from!r}")
    x = np.asarray(canvas)
    if x.ndim != 2:
        raise ValueError(f"canvas must have shape [batch, length]; got {x.shape}")
    gen = x == mask_id
    per_row = gen.sum(axis=1)
    if np.any(per_row != per_row[0]):
        raise ValueError(f"every row of the canvas must hold the same number of mask tokens; got {per_row.tolist()}")
    if reference is not None and np.shape(reference) != x.shape:
        raise ValueError(f"reference must have the canvas's shape {x.shape}; got {np.shape(reference)}")
    num_gen = int(per_row[0])
    prompt_length = int(np.argmax(gen, axis=1).min())
    if block_context >= max(prompt_length, 1):
        raise ValueError(f"block_context must be smaller than the prompt (the positions before the first one to "
                         f"generate: {prompt_length}); got {block_context}")
    block_length = num_gen if block_length is None else block_length
    spb, counts = schedule(num_gen, steps, block_length)
    dense_steps = _warmup_steps(dense_warmup, steps)

    plan = model.attention if plan is None else plan
    num_layers = model.cfg.num_layers
    if estimate_from == "block":
        _check_block_estimates(plan, num_layers)
    if prompt_sparsity is not None:
        plan = _with_region_budgets(plan, num_layers, prompt_length=prompt_length,
                                   prompt_sparsity=prompt_sparsity, gen_sparsity=gen_sparsity)
    drift_block = None
    if refresh_drift is not None and plan.kind == "ba":
        drift_block = next((c.block_k for c in (plan.layer_config(i, num_layers) for i in range(num_layers)) if c),
                           None)
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(0) if key is None else key
    # Positions of each decoding block, row by row [B, m] (every row has the same count in each block).
    order = np.argsort(~gen, axis=1, kind="stable")[:, :num_gen]
    block_positions = [jnp.asarray(order[:, j: j + block_length], jnp.int32) for j in range(0, num_gen, block_length)]
    x = jnp.asarray(x, jnp.int32)
    unmask_step = jnp.full(x.shape, -1, jnp.int32)
    if reference is not None:
        reference = jnp.asarray(reference, jnp.int32)
        reference_logprob = jnp.full(x.shape, jnp.nan, jnp.float32)
    else:
        reference_logprob = None
    sels = x_at_estimate = estimate_block = None
    densities, kinds = [], []
    since_estimate = 0
    for step in range(steps):
        kind = "dense" if step < dense_steps or plan.kind == "dense" else "reuse"
        if kind == "reuse" and (sels is None or (reuse_every is not None and since_estimate >= reuse_every) or (
                drift_block is not None
                and float(_max_block_change(x, x_at_estimate, block=drift_block)) >= refresh_drift) or (
                estimate_from == "block" and estimate_block != step // spb)):
            kind = "estimate"
        positions = block_positions[step // spb]
        focus = None
        if kind == "estimate" and estimate_from == "block":
            # The states that predict the block's tokens (one position to the left under shifted logits),
            # after the block_context positions before the block.
            focus = positions
            if block_context:
                before = positions[:, :1] - block_context + jnp.arange(block_context, dtype=jnp.int32)[None, :]
                focus = jnp.concatenate([before, positions], axis=1)
            focus = jnp.maximum(focus - 1, 0) if model.cfg.shift_logits else focus
        # The warm-up of a BA-Att plan compiles the program of the default dense plan, shared with dense runs.
        step_plan = AttentionPlan.dense() if kind == "dense" and plan.kind != "dense" else plan
        logits, made, density = _decode_forward(graphdef, step_plan, kind)(
            state, x, positions, sels if kind == "reuse" else None, focus)
        if kind == "estimate":
            sels, x_at_estimate, since_estimate, estimate_block = made, x, 0, step // spb
        if kind != "dense":
            since_estimate += 1
        densities.append(density)
        kinds.append(kind)
        key, sub = jax.random.split(key)
        x, unmask_step, reference_logprob = _commit(
            logits, x, positions, counts[step], sub, jnp.float32(max(temperature, 1e-6)), unmask_step, step,
            reference, reference_logprob, mask_id=mask_id, vocab_limit=vocab_limit, remasking=remasking,
            greedy=temperature == 0)
    return SampleResult(np.asarray(x), np.asarray(unmask_step), [float(d) for d in densities], kinds,
                        None if reference_logprob is None else np.asarray(reference_logprob))
