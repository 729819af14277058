"""Training of the masked-diffusion LM: AdamW with warmup + cosine, bf16 compute, jit, clipping,
periodic evaluation, resumable orbax checkpoints, tqdm progress (loss, tokens/s).

Batches mix packed real text (every token eligible for masking) with synthetic
long-context task examples (only the answer span is eligible, as in LLaDA's
SFT), so the model learns retrieval. Training runs in stages of
(end of progress, sequence length, batch size[, task fraction]); progress is the larger of
step/steps and elapsed/time_budget_s, so a run can be fitted to a wall-clock
budget: the learning-rate schedule follows progress, not the step count.
With ``stage_gate`` a stage's progress end is a cap: the run moves on as soon
as one-shot passkey accuracy at the stage's length reaches the gate, so the
time a seed spends on short rows follows what it has learnt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from baatt.data import corpus, tasks
from baatt.data.batches import BatchStream
from baatt.data.tokenizer import Tokenizer, get_tokenizer
from baatt.diffusion.masking import diffusion_loss_gathered, head_positions_for, masked_ce
from baatt.nn import AttentionPlan, DiffusionLM, get_config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "tiny"
    model_overrides: tuple[tuple[str, object], ...] = ()
    # (progress end, seq_len, batch) or (progress end, seq_len, batch, task_fraction of that stage)
    stages: tuple[tuple, ...] = ((1.0, 128, 8),)
    steps: int = 100
    time_budget_s: float | None = None
    peak_lr: float = 1e-3
    end_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b2: float = 0.95
    eps: float = 1e-3
    task_fraction: float = 0.0
    task_kinds: tuple[str, ...] = ("passkey", "multikey_niah", "variable_tracking")
    eval_every: int = 50
    eval_batches: int = 2
    eval_tasks: int = 16
    eval_len: int | None = None  # default: the last stage's seq_len
    full_task_answers: bool = True  # task rows: mask the whole answer (t = 1), no 1/t weight
    # < 1: task rows draw t ~ U(task_answer_t_min, 1] instead of t = 1 (part of the answer visible, as
    # in the sampler's later steps; a model trained on whole-answer masks only never sees that state).
    task_answer_t_min: float = 1.0
    # Digits of the training passkeys, drawn uniformly from [lo, hi] per example (the evaluation keeps 5).
    # A 5-digit key is 2 or 3 GPT-2 tokens; wider ranges give answers of 1-4 tokens, i.e. many more tokens
    # that must be copied by their position inside the key rather than next to fixed text.
    passkey_digits: tuple[int, int] = (5, 5)
    # > 0: training passkey rows ask the question once per this many tokens (copies at random depths,
    # every answer masked and scored) instead of once at the end: several retrievals per row, from
    # varied distances, for the cost of one. The evaluation always asks once, at the end.
    passkey_question_every: int = 0
    # None: training passkeys as drawn (5 digits: a middle answer token in ~34%); p in [0, 1]: that share
    # of them has one (the token that no fixed text sits next to, hence the hardest to copy).
    passkey_middle_share: float | None = None
    # Processes that build batches (0: one background thread). Short rows full of task examples take
    # longer to build in Python than a GPU step (see baatt.data.batches); a few workers hide that.
    batch_workers: int = 0
    # Output head (and softmax CE) at this many positions per row only, masked ones first (an unbiased
    # estimate of the full loss, exact when a row has at most that many masked tokens; see
    # baatt.diffusion.masking.diffusion_loss_gathered): None = every position, an int K, or a float in
    # (0, 1] = that fraction of each stage's seq_len (rounded up).
    head_positions: int | float | None = None
    # Competence gate: None = stages end at their progress end only; g in (0, 1] = a stage other than
    # the last also ends at the first check (every gate_every steps) whose one-shot passkey accuracy
    # at the stage's length, on eval_tasks held-out examples, is >= g. Needs passkey task rows.
    stage_gate: float | None = None
    gate_every: int = 200
    ckpt_dir: str | None = None
    ckpt_every: int = 200
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not self.stages or any(len(s) not in (3, 4) for s in self.stages):
            raise ValueError("stages must be a non-empty tuple of (progress_end, seq_len, batch[, task_fraction]); "
                             f"got {self.stages!r}")
        for s in self.stages:
            if len(s) == 4 and not 0.0 <= s[3] <= 1.0:
                raise ValueError(f"a stage's task_fraction must lie in [0, 1]; got {s!r}")
        if abs(self.stages[-1][0] - 1.0) > 1e-9:
            raise ValueError(f"the last stage must end at progress 1.0; got {self.stages[-1][0]}")
        if not 0.0 <= self.task_fraction <= 1.0:
            raise ValueError(f"task_fraction must lie in [0, 1]; got {self.task_fraction}")
        for k in self.task_kinds:
            if k not in tasks.TASKS:
                raise ValueError(f"task_kinds entries must be one of {tuple(tasks.TASKS)}; got {k!r}")
        lo_hi = self.passkey_digits
        if not (isinstance(lo_hi, tuple) and len(lo_hi) == 2 and all(isinstance(x, int) for x in lo_hi)
                and 1 <= lo_hi[0] <= lo_hi[1] <= 12):
            raise ValueError(f"passkey_digits must be a tuple (lo, hi) of ints with 1 <= lo <= hi <= 12; got {lo_hi!r}")
        if isinstance(self.batch_workers, bool) or not isinstance(self.batch_workers, int) or self.batch_workers < 0:
            raise ValueError(f"batch_workers must be an int >= 0; got {self.batch_workers!r}")
        q = self.passkey_question_every
        if isinstance(q, bool) or not isinstance(q, int) or not (q == 0 or q >= 64):
            raise ValueError(f"passkey_question_every must be 0 (off) or an int >= 64 tokens; got {q!r}")
        m = self.passkey_middle_share
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0):
            raise ValueError(f"passkey_middle_share must be None or a number in [0, 1]; got {m!r}")
        if not 0.0 < self.task_answer_t_min <= 1.0:
            raise ValueError(f"task_answer_t_min must lie in (0, 1]; got {self.task_answer_t_min}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        g = self.stage_gate
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g <= 1.0:
                raise ValueError(f"stage_gate must be None or a number in (0, 1]; got {g!r}")
            if "passkey" not in self.task_kinds:
                raise ValueError(f"stage_gate checks passkey accuracy: task_kinds must include 'passkey'; got {self.task_kinds!r}")
        if isinstance(self.gate_every, bool) or not isinstance(self.gate_every, int) or self.gate_every < 1:
            raise ValueError(f"gate_every must be an int >= 1; got {self.gate_every!r}")
        head_positions_for(1, self.head_positions)  # validates

    def stage_task_fraction(self, stage) -> float:
        """Task fraction of one ``stages`` entry: its 4th element, else ``task_fraction``."""
        return stage[3] if len(stage) == 4 else self.task_fraction

    def batch_kwargs(self, task_fraction: float) -> dict:
        """Keyword arguments of ``make_batch`` / ``BatchStream`` at a stage's task fraction."""
        return dict(task_fraction=task_fraction, task_kinds=self.task_kinds,
                    passkey_digits=self.passkey_digits, passkey_question_every=self.passkey_question_every,
                    passkey_middle_share=self.passkey_middle_share)

    def model_config(self):
        return get_config(self.model, **dict(self.model_overrides))


# -- data -------------------------------------------------------------------------


# -- optimiser ----------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig):
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=cfg.peak_lr, b1=0.9, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        ),
    )


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from peak to end_lr_frac*peak over progress."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    c = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.peak_lr * (cfg.end_lr_frac + (1 - cfg.end_lr_frac) * c)


def _set_lr(opt_state, lr):
    inner = opt_state[1]
    inner.hyperparams["learning_rate"] = jnp.asarray(lr, inner.hyperparams["learning_rate"].dtype)
    return opt_state


def build_step(graphdef, tx, mask_id, eps, full_task_answers=True, head_positions=None, task_answer_t_min=1.0):
    """Jitted train step (params, opt_state, tokens, elig, key) -> (params, opt_state, metrics).

    head_positions: see ``TrainConfig.head_positions`` (None: the head at every position).
    """
    head_positions_for(1, head_positions)  # validates

    def loss_fn(params, tokens, elig, key):
        model = nnx.merge(graphdef, params)
        task_rows = ~jnp.all(elig, axis=-1)  # rows whose eligible region is an answer span
        return diffusion_loss_gathered(lambda x: model.hidden(x), model.logits, key, tokens, mask_id=mask_id,
                                       head_positions=head_positions, eligible=elig, eps=eps,
                                       full_rows=task_rows if full_task_answers else None,
                                       full_rows_t_min=task_answer_t_min)

    @jax.jit
    def step(params, opt_state, tokens, elig, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, elig, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


# -- evaluation -----------------------------------------------------------------------


def masked_nll(model, tokens, key, *, plan=None, t_values=(0.15, 0.5, 0.85)):
    """Mean CE per masked token at fixed masking ratios (one shared key): dict t -> nll, plus 'avg'."""
    from baatt.diffusion.masking import forward_process

    fwd = _nll_fn(nnx.graphdef(model), plan)
    state = nnx.state(model)
    out = {}
    for t in t_values:
        noisy, masked, _ = forward_process(key, jnp.asarray(tokens), mask_id=model.cfg.mask_id, t=t)
        s, n, dens = fwd(state, noisy, jnp.asarray(tokens), masked)
        out[f"t={t}"] = float(s / jnp.maximum(n, 1))
        out["density"] = float(dens)
    out["avg"] = float(np.mean([out[f"t={t}"] for t in t_values]))
    return out


_NLL_CACHE: dict = {}


def _nll_fn(graphdef, plan):
    k = (graphdef, plan)
    if k not in _NLL_CACHE:
        @jax.jit
        def f(state, noisy, tokens, masked):
            model = nnx.merge(graphdef, state)
            logits, aux = model(noisy, attention=plan, return_aux=True)
            ce = masked_ce(logits, tokens, masked)
            dens = jnp.mean(jnp.stack([jnp.mean(d) for d in aux["density"]]))
            return jnp.sum(ce), jnp.sum(masked), dens
        _NLL_CACHE[k] = f
    return _NLL_CACHE[k]


def accuracy_split(results) -> dict[str, dict[str, list[int]]]:
    """[correct, examples] counts of task answers, per group and key, from (example, token hits) pairs.

    Groups: ``by_answer_tokens`` (answer length in tokens; a 5-digit key is 2 or 3 GPT-2 tokens, and
    the middle one of 3 has no fixed neighbour to anchor a copy on), ``by_depth`` (needle depth
    third, 0 = first third of the haystack; exact match) and ``token_acc`` (answer-token position:
    first / middle / last token correct).
    """
    cells: dict[str, dict[str, list[int]]] = {"by_answer_tokens": {}, "by_depth": {}, "token_acc": {}}

    def count(group, key, ok):
        c = cells[group].setdefault(str(key), [0, 0])
        c[0] += bool(ok)
        c[1] += 1

    for e, hit in results:
        ok = bool(np.all(hit))
        count("by_answer_tokens", hit.size, ok)
        count("by_depth", min(int(3 * e.depths[e.target]), 2), ok)
        for pos, h in enumerate(hit):
            count("token_acc", "first" if pos == 0 else "last" if pos == hit.size - 1 else "middle", h)
    return {g: dict(sorted(v.items())) for g, v in cells.items()}


def task_accuracy_oneshot(model, examples, *, plan=None, batch=8, diagnostics: bool = False):
    """Fraction of examples whose whole answer span is predicted exactly, all answer tokens masked, one forward.

    diagnostics: return (accuracy, split): the accuracy per group and key of :func:`accuracy_split`.
    """
    state, gd = nnx.state(model), nnx.graphdef(model)
    f = _argmax_fn(gd, plan)
    results = []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        toks = np.stack([e.tokens for e in chunk])
        noisy = toks.copy()
        for j, e in enumerate(chunk):
            noisy[j, e.answer_start : e.answer_end] = model.cfg.mask_id
        pred = np.asarray(f(state, jnp.asarray(noisy)))
        results += [(e, pred[j, e.answer_start : e.answer_end] == e.answer_tokens) for j, e in enumerate(chunk)]
    acc = sum(bool(np.all(hit)) for _, hit in results) / max(len(examples), 1)
    if diagnostics:
        return acc, {g: {k: c / t for k, (c, t) in v.items()} for g, v in accuracy_split(results).items()}
    return acc


_ARGMAX_CACHE: dict = {}


def _argmax_fn(graphdef, plan):
    k = (graphdef, plan)
    if k not in _ARGMAX_CACHE:
        @jax.jit
        def f(state, x):
            model = nnx.merge(graphdef, state)
            logits = model(x, attention=plan)
            # ids from the mask on (the mask token, then any padding rows of the vocabulary) are never answers
            return jnp.argmax(logits[..., : model.cfg.mask_id], axis=-1)
        _ARGMAX_CACHE[k] = f
    return _ARGMAX_CACHE[k]


# -- checkpoints --------------------------------------------------------------------------


def _manager(path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(Path(path).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save_checkpoint(mngr, step, params, opt_state, extra=None):
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(dict(params=nnx.to_pure_dict(params), opt_state=opt_state)),
        meta=ocp.args.JsonSave(dict(step=step, **(extra or {}))),
    ))


def restore_checkpoint(mngr, params, opt_state, step=None):
    import orbax.checkpoint as ocp

    step = mngr.latest_step() if step is None else step
    target = dict(params=nnx.to_pure_dict(params), opt_state=opt_state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(params, got["state"]["params"])
    return params, got["state"]["opt_state"], got["meta"]


def restore_weights(model: DiffusionLM, ckpt_dir, *, step=None) -> int:
    """Load the weights of a checkpoint written by :func:`train` into ``model`` (same configuration);
    returns the step restored (default: the latest)."""
    import orbax.checkpoint as ocp

    params = nnx.state(model)
    mngr = _manager(ckpt_dir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    abstract = dict(params=jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params)))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(), abstract), partial_restore=True)))
    nnx.replace_by_pure_dict(params, got["state"]["params"])
    nnx.update(model, params)
    return step


def load_model(ckpt_dir, *, step=None) -> tuple[DiffusionLM, dict]:
    """Model from a checkpoint written by :func:`train` (its config is stored beside it)."""
    meta = json.loads((Path(ckpt_dir) / "train_config.json").read_text())
    mcfg = get_config(meta["model"], **dict(meta.get("model_overrides", {})))
    model = DiffusionLM(mcfg, rngs=nnx.Rngs(0))
    step = restore_weights(model, ckpt_dir, step=step)
    return model, dict(step=step, **meta)


def run_info() -> dict:
    """device, jax version, commit and date of a run (for results JSON)."""
    import datetime
    import os
    import subprocess

    try:
        commit = os.environ.get("BAATT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    dev = jax.devices()[0]
    return dict(device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}", jax_version=jax.__version__, commit=commit,
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


# -- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, model: DiffusionLM | None = None, tokenizer=None, train_stream=None, val_stream=None,
          log_fn=print) -> dict:
    """Train; returns {'history': [...], 'model': DiffusionLM, 'steps': n, 'seconds': s}.

    model: the model to start from, e.g. pretrained weights adapted by ``baatt.adapt`` (default: a
      fresh ``DiffusionLM`` of ``cfg.model_config()``); it needs a mask token. A checkpoint in
      ``cfg.ckpt_dir`` replaces its weights. tokenizer: the one the streams were made with, for
      the task examples (default: GPT-2 BPE, that of ``baatt.data.corpus``).
    A time-budgeted run resumed from a checkpoint goes on from the elapsed time stored with it, so
    a finished run resumes to its final evaluation without further steps.
    """
    from tqdm.auto import tqdm

    if tokenizer is None:
        tokenizer = get_tokenizer()
    elif cfg.batch_workers and not isinstance(tokenizer, Tokenizer):
        raise ValueError("batch_workers must be 0 with a tokenizer other than GPT-2's (worker processes rebuild "
                         f"the GPT-2 tokenizer from its path); got {cfg.batch_workers} with {type(tokenizer).__name__}")
    train_stream = corpus.load_tokens("train") if train_stream is None else train_stream
    val_stream = corpus.load_tokens("val") if val_stream is None else val_stream
    mcfg = cfg.model_config() if model is None else model.cfg
    if mcfg.mask_id is None:
        raise ValueError("the model must have a mask token (ModelConfig.mask_id); got mask_id=None")
    max_len = max(s[1] for s in cfg.stages)
    if max_len > mcfg.max_len:
        raise ValueError(f"stage seq_len must be at most ModelConfig.max_len={mcfg.max_len}; got {max_len}")
    fresh = model is None
    if fresh:
        model = DiffusionLM(mcfg, rngs=nnx.Rngs(cfg.seed))
    if fresh and mcfg.output_bias:
        # Start at the unigram (see DiffusionLM.set_output_bias): on CPU (d=64, 2048-token vocab, 600 steps)
        # held-out masked CE at t=0.15 went 5.02 -> 4.74 (unigram 5.08) with this bias.
        model.set_output_bias(np.bincount(np.asarray(train_stream), minlength=mcfg.vocab_size)[: mcfg.vocab_size])
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    start_step = 0
    resumed_stage = 0
    resumed_elapsed = 0.0
    mngr = None
    if cfg.ckpt_dir:
        Path(cfg.ckpt_dir).mkdir(parents=True, exist_ok=True)
        meta = dict(model=cfg.model, model_overrides=dict(cfg.model_overrides))
        (Path(cfg.ckpt_dir) / "train_config.json").write_text(json.dumps(dict(meta, train=dataclasses.asdict(cfg)), default=str))
        mngr = _manager(cfg.ckpt_dir)
        if mngr.latest_step() is not None:
            params, opt_state, m = restore_checkpoint(mngr, params, opt_state)
            start_step = int(m["step"])
            resumed_stage = int(m.get("stage", 0))
            resumed_elapsed = float(m.get("elapsed_s", 0.0))
            log_fn(f"resumed from step {start_step}")
    step_fn = build_step(graphdef, tx, mcfg.mask_id, cfg.eps, cfg.full_task_answers, cfg.head_positions,
                         cfg.task_answer_t_min)

    seed_seq = np.random.SeedSequence([cfg.seed, start_step])

    last_stage = len(cfg.stages) - 1
    stage_idx = resumed_stage  # never goes back: a gate may have moved it past the stage that progress alone gives

    def stage_of(idx):
        """(seq_len, batch, task_fraction) of ``cfg.stages[idx]``."""
        stage = cfg.stages[idx]
        return stage[1], stage[2], cfg.stage_task_fraction(stage)

    source = None  # (stage, BatchStream) of the current stage; a new stage closes the old builders

    def batches(stage):
        nonlocal source
        if source is None or source[0] != stage:
            if source is not None:
                source[1].close()
            l, b, tf = stage
            source = (stage, BatchStream(
                seed_seq.spawn(1)[0], train_stream, tokenizer, l, b, workers=cfg.batch_workers, **cfg.batch_kwargs(tf)))
        return source[1]

    erng = np.random.default_rng(1234)
    eval_len = cfg.eval_len or cfg.stages[-1][1]
    eval_tokens = corpus.packed_batch(val_stream, erng, max(2, cfg.eval_batches * 2), eval_len)
    eval_examples: dict[int, list] = {}  # passkey examples per length, drawn once (same ones at every evaluation)

    def passkey_examples(length):
        if length not in eval_examples:
            eval_examples[length] = [tasks.passkey(erng, val_stream, tokenizer, length) for _ in range(cfg.eval_tasks)]
        return eval_examples[length]

    def evaluate(step, stage_len=None):
        """Held-out NLL at eval_len; one-shot passkey accuracy at eval_len and at the current stage's length."""
        model_now = nnx.merge(graphdef, params)
        res = dict(step=step, val_nll=masked_nll(model_now, eval_tokens, jax.random.PRNGKey(7), plan=AttentionPlan.dense())["avg"])
        if cfg.task_fraction or any(cfg.stage_task_fraction(s) for s in cfg.stages):
            for length in sorted({eval_len, stage_len or eval_len}):
                if length >= tasks.MIN_LENGTH:
                    acc, split = task_accuracy_oneshot(model_now, passkey_examples(length), plan=AttentionPlan.dense(),
                                                       diagnostics=True)
                    name = "passkey_acc" if length == eval_len else f"passkey_acc@{length}"
                    res[name] = acc
                    res[name + "_split"] = split
        return res

    history = []
    key = jax.random.PRNGKey(cfg.seed + 1)
    t0 = time.time() - resumed_elapsed
    tok_count, tok_t = 0, time.time()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, dynamic_ncols=True, mininterval=2.0 if jax.default_backend() == "cpu" else 15.0)
    step = start_step
    metrics = None
    try:
        while step < cfg.steps:
            elapsed = time.time() - t0
            progress = step / cfg.steps
            if cfg.time_budget_s:
                progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                break
            stage_idx = max(stage_idx, next((i for i, s in enumerate(cfg.stages) if progress < s[0]), last_stage))
            l, b, tf = stage_of(stage_idx)
            toks, elig = batches((l, b, tf)).get()
            opt_state = _set_lr(opt_state, lr_at(cfg, step, progress))
            key, sub = jax.random.split(key)
            params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(toks), jnp.asarray(elig), sub)
            step += 1
            tok_count += toks.size
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps:
                m = jax.device_get(metrics)
                now = time.time()
                tps = tok_count / max(now - tok_t, 1e-9)
                tok_count, tok_t = 0, now
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}", L=l, lr=f"{lr_at(cfg, step, progress):.1e}")
                history.append(dict(step=step, loss=float(m["loss"]), masked_ce=float(m["masked_ce"]),
                                    grad_norm=float(m["grad_norm"]), tokens_per_s=tps, seq_len=l, task_fraction=tf,
                                    elapsed_s=now - t0))
            if cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate(step, stage_len=l)
                history.append(dict(ev, elapsed_s=time.time() - t0))
                log_fn(json.dumps(ev))
            if (cfg.stage_gate is not None and stage_idx < last_stage and step % cfg.gate_every == 0
                    and l >= tasks.MIN_LENGTH):
                acc = task_accuracy_oneshot(nnx.merge(graphdef, params), passkey_examples(l), plan=AttentionPlan.dense())
                passed = acc >= cfg.stage_gate
                history.append(dict(step=step, gate_acc=acc, seq_len=l, passed=passed, elapsed_s=time.time() - t0))
                if passed:
                    stage_idx += 1
                    log_fn(json.dumps(dict(step=step, stage_gate_passed=acc, seq_len=l, next_seq_len=cfg.stages[stage_idx][1])))
            if mngr is not None and step % cfg.ckpt_every == 0:
                save_checkpoint(mngr, step, params, opt_state, extra=dict(stage=stage_idx, elapsed_s=time.time() - t0))
    finally:
        bar.close()
        if source is not None:
            source[1].close()
    # The last step is saved before the final evaluation (the save is asynchronous and overlaps it), so a
    # process stopped during that evaluation still leaves the trained weights.
    if mngr is not None and mngr.latest_step() != step:
        save_checkpoint(mngr, step, params, opt_state, extra=dict(stage=stage_idx, elapsed_s=time.time() - t0))
    final = evaluate(step)
    history.append(dict(final, elapsed_s=time.time() - t0, final=True))
    log_fn(json.dumps(final))
    if mngr is not None:
        mngr.wait_until_finished()
    model = nnx.merge(graphdef, params)
    return dict(history=history, model=model, steps=step, seconds=time.time() - t0)
