"""Masked diffusion: forward process, loss, the LLaDA sampler, and a tiny CPU training run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from baatt import BAConfig
from baatt.diffusion import diffusion_loss, forward_process, generate, schedule
from baatt.nn import AttentionPlan, DiffusionLM, get_config

CFG = get_config("tiny", max_len=256, vocab_size=512, mask_id=511)
MASK = CFG.mask_id


@pytest.fixture(scope="module")
def model():
    return DiffusionLM(CFG, rngs=nnx.Rngs(0))


def test_forward_process_masks_only_eligible():
    toks = jnp.arange(4 * 50).reshape(4, 50) % 400
    elig = jnp.arange(50)[None, :] >= 20
    noisy, masked, t = forward_process(jax.random.PRNGKey(0), toks, mask_id=MASK, eligible=jnp.broadcast_to(elig, (4, 50)))
    assert bool(jnp.all((t > 1e-3) & (t <= 1.0)))
    assert not bool(jnp.any(masked[:, :20]))
    assert bool(jnp.all(jnp.where(masked, noisy == MASK, noisy == toks)))
    full = jnp.asarray([True, False, False, False])
    _, masked, t = forward_process(jax.random.PRNGKey(0), toks, mask_id=MASK, eligible=jnp.broadcast_to(elig, (4, 50)),
                                   full_rows=full)
    assert float(t[0]) == 1.0 and bool(jnp.all(masked[0, 20:])) and not bool(jnp.any(masked[0, :20]))
    _, masked, _ = forward_process(jax.random.PRNGKey(1), jnp.zeros((64, 400), jnp.int32), mask_id=MASK, t=0.3)
    assert abs(float(jnp.mean(masked)) - 0.3) < 0.01
    with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\)"):
        forward_process(jax.random.PRNGKey(0), toks, mask_id=MASK, eps=0.0)


def test_forward_process_partial_answers_of_full_rows():
    """full_rows_t_min < 1: those rows draw t in [t_min, 1] (part of the answer visible), the others are unchanged."""
    b, length = 512, 40
    toks = jnp.ones((b, length), jnp.int32)
    full = jnp.arange(b) % 2 == 0
    key = jax.random.PRNGKey(3)
    _, m1, t1 = forward_process(key, toks, mask_id=MASK, full_rows=full)
    _, m2, t2 = forward_process(key, toks, mask_id=MASK, full_rows=full, full_rows_t_min=0.5)
    assert bool(jnp.all(t1[full] == 1.0)) and bool(jnp.all(m1[full]))
    tf = t2[full]
    assert float(tf.min()) >= 0.5 and float(tf.max()) <= 1.0 and float(jnp.std(tf)) > 0.1  # spread over [0.5, 1]
    assert abs(float(jnp.mean(m2[full])) - 0.75) < 0.02  # E[t] = 0.75: part of each answer stays visible
    assert bool(jnp.all(t1[~full] == t2[~full])) and bool(jnp.all(m1[~full] == m2[~full]))
    with pytest.raises(ValueError, match=r"full_rows_t_min must lie in \(0, 1\]"):
        forward_process(key, toks, mask_id=MASK, full_rows=full, full_rows_t_min=0.0)


def test_loss_decreases_on_tiny_cpu_run():
    model = DiffusionLM(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # Learnable data: repeated short patterns.
    base = rng.integers(0, 500, (4, 8))
    toks = jnp.asarray(np.tile(base, (1, 8)), jnp.int32)  # [4, 64]
    gd, params = nnx.split(model)
    tx = optax.adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        def lf(p):
            m = nnx.merge(gd, p)
            return diffusion_loss(lambda x: m(x), key, toks, mask_id=MASK)

        (loss, met), g = jax.value_and_grad(lf, has_aux=True)(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), opt, loss

    losses = []
    for i in range(40):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i % 4))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses


def test_train_loop_checkpoints_and_resumes(tmp_path):
    from baatt.data import corpus
    from baatt.train import TrainConfig, load_model, train

    val = corpus.load_tokens("val")
    cfg = TrainConfig(model="tiny", model_overrides=(("max_len", 512),), stages=((1.0, 32, 2),), steps=3,
                      warmup_steps=1, eval_every=0, ckpt_dir=str(tmp_path / "ck"), ckpt_every=2, progress=False)
    r = train(cfg, train_stream=val, val_stream=val, log_fn=lambda s: None)
    assert r["steps"] == 3 and any("loss" in h for h in [{"loss": 0}] + r["history"])
    logs = []
    r2 = train(TrainConfig(**{**cfg.__dict__, "steps": 4}), train_stream=val, val_stream=val, log_fn=logs.append)
    assert r2["steps"] == 4 and logs[0] == "resumed from step 3"
    m, meta = load_model(tmp_path / "ck")
    assert meta["step"] == 4
    a = jax.tree.leaves(nnx.state(m, nnx.Param))
    b = jax.tree.leaves(nnx.state(r2["model"], nnx.Param))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="stage seq_len must be at most ModelConfig.max_len"):
        train(TrainConfig(model="tiny", stages=((1.0, 2048, 1),)), train_stream=val, val_stream=val)


def test_train_saves_the_last_step_before_its_final_evaluation(tmp_path, monkeypatch):
    """A run stopped during its final evaluation (a wall-clock limit) still leaves its last step on disk: the
    save of that step is issued before the evaluation starts."""
    from baatt import train as train_module
    from baatt.data import corpus

    events = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda mngr, step, *a, **k: (events.append(("save", step)), real_save(mngr, step, *a, **k)))
    real_evaluate = train_module.masked_nll  # the first thing an evaluation computes
    monkeypatch.setattr(train_module, "masked_nll",
                        lambda *a, **k: (events.append(("evaluate",)), real_evaluate(*a, **k))[1])
    val = corpus.load_tokens("val")
    cfg = train_module.TrainConfig(model="tiny", model_overrides=(("max_len", 512),), stages=((1.0, 32, 2),),
                                   steps=3, warmup_steps=1, eval_every=0, ckpt_dir=str(tmp_path / "ck"), ckpt_every=2,
                                   progress=False)
    train_module.train(cfg, train_stream=val, val_stream=val, log_fn=lambda s: None)
    assert ("save", 3) in events and ("evaluate",) in events
    assert events.index(("save", 3)) < events.index(("evaluate",)), events


def test_train_stages_set_their_own_task_fraction():
    from baatt.data import corpus
    from baatt.train import TrainConfig, train

    val = corpus.load_tokens("val")
    cfg = TrainConfig(model="tiny", model_overrides=(("max_len", 512),), stages=((0.5, 64, 2, 1.0), (1.0, 64, 2, 0.0)),
                      steps=20, warmup_steps=1, eval_every=10, eval_tasks=2, task_kinds=("passkey",), progress=False)
    r = train(cfg, train_stream=val, val_stream=val, log_fn=lambda s: None)
    fr = {h["step"]: h["task_fraction"] for h in r["history"] if "task_fraction" in h}
    assert fr == {10: 1.0, 20: 0.0}
    assert all("passkey_acc" in h for h in r["history"] if "val_nll" in h)  # a stage has task rows: passkey checked
    r = train(dataclasses.replace(cfg, steps=4, eval_every=0, batch_workers=1), train_stream=val, val_stream=val,
              log_fn=lambda s: None)
    assert r["steps"] == 4  # batches from a worker process
    with pytest.raises(ValueError, match="batch_workers must be an int >= 0"):
        TrainConfig(batch_workers=-1)
    with pytest.raises(ValueError, match="a stage's task_fraction must lie in"):
        TrainConfig(stages=((1.0, 64, 2, 1.5),))
    with pytest.raises(ValueError, match="stages must be a non-empty tuple"):
        TrainConfig(stages=((1.0, 64),))


def test_stage_gate_moves_on_when_the_check_passes_and_not_before(monkeypatch):
    import baatt.train as train_mod
    from baatt.data import corpus
    from baatt.train import TrainConfig, train

    val = corpus.load_tokens("val")
    cfg = TrainConfig(model="tiny", model_overrides=(("max_len", 512),), stages=((0.9, 64, 2, 1.0), (1.0, 96, 2, 1.0)),
                      steps=12, warmup_steps=1, eval_every=0, eval_tasks=2, task_kinds=("passkey",), progress=False,
                      stage_gate=0.8, gate_every=2)
    real = train_mod.task_accuracy_oneshot
    scripted = iter([0.5, 0.75, 0.8125])  # the gate checks at steps 2, 4, 6: the third passes

    def check(model, examples, **kw):
        return real(model, examples, **kw) if kw.get("diagnostics") else next(scripted)

    monkeypatch.setattr(train_mod, "task_accuracy_oneshot", check)
    r = train(cfg, train_stream=val, val_stream=val, log_fn=lambda s: None)
    gates = [(h["step"], h["gate_acc"], h["seq_len"], h["passed"]) for h in r["history"] if "gate_acc" in h]
    assert gates == [(2, 0.5, 64, False), (4, 0.75, 64, False), (6, 0.8125, 64, True)]
    # Losses are logged every 10 steps: step 10 ran 96-token rows after the gate, 64-token ones without it
    # (progress alone leaves the first stage at step 11).
    assert [(h["step"], h["seq_len"]) for h in r["history"] if "loss" in h] == [(10, 96), (12, 96)]
    r = train(dataclasses.replace(cfg, stage_gate=None), train_stream=val, val_stream=val, log_fn=lambda s: None)
    assert not [h for h in r["history"] if "gate_acc" in h]
    assert [(h["step"], h["seq_len"]) for h in r["history"] if "loss" in h] == [(10, 64), (12, 96)]
    with pytest.raises(ValueError, match="stage_gate must be None or a number in"):
        TrainConfig(stage_gate=0.0)
    with pytest.raises(ValueError, match="task_kinds must include 'passkey'"):
        TrainConfig(stage_gate=0.5, task_kinds=("multikey_niah",))
    with pytest.raises(ValueError, match="gate_every must be an int >= 1"):
        TrainConfig(gate_every=0)


def test_one_step_decoding_is_the_argmax_of_one_forward(model):
    """steps=1 over the whole span (eval_dlm --task-decode oneshot) = argmax below the mask id of one forward pass."""
    x = _canvas(b=3, prompt=30, gen=5, seed=4)
    r = generate(model, x, steps=1, block_length=5)
    logits = np.asarray(model(jnp.asarray(x)), np.float32)
    want = np.argmax(logits[..., :MASK], axis=-1)
    assert np.array_equal(r.tokens[:, 30:], want[:, 30:]) and np.array_equal(r.tokens[:, :30], x[:, :30])
    assert np.all(r.unmask_step[:, 30:] == 0)


def _canvas(b=2, prompt=40, gen=24, seed=0):
    x = np.random.default_rng(seed).integers(0, 500, (b, prompt + gen)).astype(np.int32)
    x[:, prompt:] = MASK
    return x


@pytest.mark.parametrize("temperature,remasking", [(0.0, "low_confidence"), (1.0, "low_confidence"), (0.7, "random")])
def test_sampler_unmasks_every_position_once_and_keeps_prompt(model, temperature, remasking):
    x = _canvas()
    steps, block = 6, 8  # 3 blocks x 2 steps
    r = generate(model, x, steps=steps, block_length=block, temperature=temperature, remasking=remasking,
                 key=jax.random.PRNGKey(1))
    gen = x == MASK
    np.testing.assert_array_equal(r.tokens[~gen], x[~gen])  # prompt untouched
    assert not np.any(r.tokens == MASK)
    assert np.all(r.unmask_step[~gen] == -1) and np.all(r.unmask_step[gen] >= 0)
    _, counts = schedule(24, steps, block)
    for row in range(x.shape[0]):
        committed = np.bincount(r.unmask_step[row][gen[row]], minlength=steps)
        np.testing.assert_array_equal(committed, counts)  # each position exactly once, on schedule
        # Semi-autoregressive: block j is decoded during its own steps only.
        for j in range(3):
            s = r.unmask_step[row, 40 + 8 * j : 48 + 8 * j]
            assert s.min() >= 2 * j and s.max() < 2 * (j + 1)
    assert r.step_density == [1.0] * steps


def test_sampler_with_full_ba_equals_dense_and_reuses_selection(model):
    x = _canvas(seed=3)
    dense = generate(model, x, steps=4, block_length=12)
    full = generate(model, x, steps=4, block_length=12, plan=AttentionPlan.ba(BAConfig(block_size=16)))
    np.testing.assert_array_equal(full.tokens, dense.tokens)
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5), compensate_layers=("first", "last"))
    r = generate(model, x, steps=8, block_length=12, plan=plan, reuse_every=3, dense_warmup=2)
    assert r.estimated == [False, False, True, False, False, True, False, False]
    assert r.step_density[:2] == [1.0, 1.0]
    assert all(abs(d - 0.5) < 1e-6 for d in r.step_density[2:])
    assert abs(r.mean_density - (2 + 6 * 0.5) / 8) < 1e-6
    assert not np.any(r.tokens == MASK)


def test_schedule_and_sampler_errors(model):
    assert schedule(10, 4, 5)[1].tolist() == [3, 2, 3, 2]
    with pytest.raises(ValueError, match="steps must be a positive multiple of the number of blocks"):
        schedule(24, 5, 8)
    with pytest.raises(ValueError, match="at least one mask token"):
        generate(model, np.zeros((1, 16), np.int32), steps=1)
    bad = _canvas()
    bad[0, 0] = MASK
    with pytest.raises(ValueError, match="same number of mask tokens"):
        generate(model, bad, steps=2)
    with pytest.raises(ValueError, match="remasking must be"):
        generate(model, _canvas(), steps=2, remasking="entropy")
    with pytest.raises(ValueError, match="reuse_every must be an int >= 1"):
        generate(model, _canvas(), steps=2, reuse_every=0)


# -- the sparse-attention recipe ----------------------------------------------------------------------


def _spy_attention(monkeypatch):
    """Record every ``baatt.attention`` call of the model's layers: (selection given, selection used, implementation).
    The old reuse path through the reference operator must not run."""
    import baatt

    calls, real = [], baatt.attention

    def spy(q, k, v, **kw):
        out, stats = real(q, k, v, **kw)
        calls.append((kw.get("selection"), stats.selection, kw.get("implementation")))
        return out, stats

    def refuse(*args, **kwargs):
        raise AssertionError("a reused selection ran baatt.reference.block_sparse_attention")

    monkeypatch.setattr(baatt, "attention", spy)
    monkeypatch.setattr(baatt.reference, "block_sparse_attention", refuse)
    return calls


def _same_selection(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in ((a.indices, b.indices), (a.counts, b.counts)))


def test_recipe_warms_up_dense_then_reuses_the_selection_estimated_after_it(model, monkeypatch):
    """dense_warmup as a fraction: those steps never reach baatt.attention; the step after them estimates a
    selection per layer; every later step passes exactly that selection to baatt.attention on the plan's
    implementation (run eagerly, so the spy sees values)."""
    calls = _spy_attention(monkeypatch)
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5), implementation="reference")
    with jax.disable_jit():
        r = generate(model, _canvas(b=1, seed=5), steps=8, block_length=12, plan=plan, dense_warmup=0.25,
                     reuse_every=None)
    assert r.step_kind == ["dense", "dense", "estimate"] + ["reuse"] * 5
    assert r.step_density[:2] == [1.0, 1.0] and all(abs(d - 0.5) < 1e-6 for d in r.step_density[2:])
    layers = CFG.num_layers
    assert len(calls) == 6 * layers  # no call in the dense steps
    estimated = [used for given, used, _ in calls[:layers]]
    assert all(given is None for given, _, _ in calls[:layers])
    for i, (given, used, implementation) in enumerate(calls[layers:]):
        assert implementation == "reference"
        assert given is not None and _same_selection(given, estimated[i % layers]) and _same_selection(used, given)
    assert not np.any(r.tokens == MASK)


def test_recipe_refresh_cadence(model):
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5))
    x = _canvas(seed=6)
    kinds = lambda **kw: generate(model, x, steps=8, block_length=12, plan=plan, **kw).step_kind
    assert kinds(dense_warmup=1, reuse_every=3) == ["dense", "estimate", "reuse", "reuse", "estimate", "reuse",
                                                    "reuse", "estimate"]
    assert kinds(reuse_every=None) == ["estimate"] + ["reuse"] * 7
    assert kinds(reuse_every=1, dense_warmup=8) == ["dense"] * 8
    assert kinds(reuse_every=1) == ["estimate"] * 8


def test_recipe_refreshes_on_drift_of_a_key_block(model):
    """refresh_drift=f: a step estimates again exactly when some key block (16 tokens) had a share >= f of its
    tokens committed since the last estimate; the committed positions depend on the model's confidence."""
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5))
    x = _canvas(b=2, prompt=40, gen=24, seed=7)
    r = generate(model, x, steps=12, block_length=24, plan=plan, reuse_every=None, refresh_drift=0.25)
    assert r.step_kind.count("estimate") >= 2
    last = 0
    for step, kind in enumerate(r.step_kind):
        changed = (r.unmask_step >= last) & (r.unmask_step < step)  # committed since the last estimate
        blocks = np.pad(changed, ((0, 0), (0, -changed.shape[1] % 16))).reshape(2, -1, 16)
        drift = (blocks.sum(-1) / 16).max() if step else 0.0
        assert (kind == "estimate") == (step == 0 or drift >= 0.25), (step, kind, drift)
        last = step if kind == "estimate" else last


def test_separate_budgets_for_prompt_and_generation_keys(model, monkeypatch):
    """prompt_gen keeps ceil((1 - s) * N) blocks of each region, each chosen by the base selector on that region's
    keys alone; generate(prompt_sparsity=, gen_sparsity=) runs it in every BA-Att layer."""
    from baatt.diffusion import PromptGenParams
    from baatt.selection import select_blocks

    q, k = (jax.random.normal(jax.random.PRNGKey(i), (1, 150, 4, 16)) for i in range(2))
    params = PromptGenParams(prompt_length=70, prompt_sparsity=0.75, gen_sparsity=0.5)
    cfg = BAConfig(block_size=16, selector="prompt_gen", selector_params=params, force_sink=True, sink_positions=(3,))
    sel = select_blocks(q, k, cfg)
    ids, counts = np.asarray(sel.indices), np.asarray(sel.counts)
    # 70 prompt tokens: 4 whole blocks (0..63) are the prompt, 6 blocks (64..149) the generation
    assert np.all(counts == 1 + 3)
    prompt_ids = np.where(np.arange(ids.shape[-1]) < counts[..., None], ids, 99)
    assert np.all(np.sum(prompt_ids < 4, axis=-1) == 1) and np.all(ids[..., 0] == 0)  # the forced sink block
    alone = select_blocks(q, k[:, 64:], BAConfig(block_size=16, sparsity=0.5))
    np.testing.assert_array_equal(ids[..., 1:4], np.asarray(alone.indices) + 4)
    sel.validate(batch=1, q_heads=4, kv_heads=4, length_q=150, length_k=150)

    calls = _spy_attention(monkeypatch)
    x = _canvas(b=2, prompt=40, gen=24, seed=8)
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.9), compensate_layers=("last",))
    r = generate(model, x, steps=4, block_length=12, plan=plan, reuse_every=2, prompt_sparsity=0.5, gen_sparsity=0.0)
    # 40 prompt tokens: 2 prompt blocks (1 kept) and 2 generation blocks (both kept) for every query block
    assert all(abs(d - 0.75) < 1e-6 for d in r.step_density)
    used = [selection for _, selection, _ in calls]
    assert used and all(selection.kmax == 3 for selection in used)  # one prompt block and two generation blocks
    assert not np.any(r.tokens == MASK)
    with pytest.raises(ValueError, match="prompt_sparsity and gen_sparsity go together"):
        generate(model, x, steps=4, plan=plan, prompt_sparsity=0.5)
    with pytest.raises(ValueError, match="need a BA-Att plan"):
        generate(model, x, steps=4, prompt_sparsity=0.5, gen_sparsity=0.5)
    with pytest.raises(ValueError, match=r"PromptGenParams.gen_sparsity must be a finite number in \[0, 1\)"):
        PromptGenParams(gen_sparsity=1.0)
    with pytest.raises(ValueError, match="PromptGenParams.base must be a registered selector other than"):
        PromptGenParams(base="prompt_gen")
    with pytest.raises(ValueError, match="takes its budgets from PromptGenParams"):
        select_blocks(q, k, cfg.replace(sparsity=0.5))
    for switch in ("sort_k", "cluster_k"):
        with pytest.raises(ValueError, match="splits keys by position: BAConfig.sort_k and cluster_k must be False"):
            select_blocks(q, k, cfg.replace(**{switch: True}))


def test_reference_logprob_scores_each_position_under_the_step_that_commits_it(model):
    x = _canvas(b=2, prompt=30, gen=6, seed=9)
    reference = np.random.default_rng(1).integers(0, MASK, x.shape)
    r = generate(model, x, steps=1, block_length=6, reference=reference)
    logits = np.asarray(model(jnp.asarray(x)), np.float64)[..., :MASK]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    want = np.take_along_axis(log_probs, reference[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.reference_logprob[:, 30:], want[:, 30:], rtol=1e-5, atol=1e-5)
    assert np.all(np.isnan(r.reference_logprob[:, :30]))
    assert r.reference_nll == pytest.approx(-want[:, 30:].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="reference must have the canvas's shape"):
        generate(model, x, steps=1, reference=reference[:, :5])
    with pytest.raises(ValueError, match="dense_warmup as a fraction of the steps must lie in"):
        generate(model, x, steps=1, dense_warmup=1.5)
    with pytest.raises(ValueError, match="refresh_drift must be None or a share in"):
        generate(model, x, steps=1, refresh_drift=0.0)


def test_train_sets_unigram_output_bias(tmp_path):
    from baatt.data import corpus
    from baatt.train import TrainConfig, load_model, train

    val = corpus.load_tokens("val")
    cfg = TrainConfig(model="tiny", model_overrides=(("max_len", 512), ("output_bias", True)), stages=((1.0, 32, 2),),
                      steps=1, warmup_steps=1, peak_lr=1e-3, eval_every=0, ckpt_dir=str(tmp_path / "ck"), progress=False)
    r = train(cfg, train_stream=val, val_stream=val, log_fn=lambda s: None)
    counts = np.bincount(np.asarray(val), minlength=50304).astype(np.float64)
    counts[50257] = 0
    want = np.log((counts + 0.1) / (counts + 0.1).sum())
    got = np.asarray(r["model"].out_bias.value)
    assert np.max(np.abs(got - want)) < 1e-2  # one Adam step moves it by about the learning rate
    m, _ = load_model(tmp_path / "ck")
    assert np.array_equal(np.asarray(m.out_bias.value), got)


# -- the output head at gathered positions only ------------------------------------------------------

from baatt.diffusion.masking import diffusion_loss_gathered, head_positions_for, select_head_positions  # noqa: E402


def _gathered_setup(seed=0, b=4, length=64):
    m = DiffusionLM(CFG.replace(output_bias=True, num_layers=1), rngs=nnx.Rngs(seed))  # one layer: quick compiles
    m.out_bias.value = 0.5 * jax.random.normal(jax.random.PRNGKey(seed), (CFG.vocab_size,))
    toks = jnp.asarray(np.random.default_rng(seed).integers(0, 500, (b, length)), jnp.int32)
    return m, toks


def _both_losses(gd, k, grads=False, **kw):
    """jitted (params, tokens, key) -> ((full loss, metrics), (gathered loss, metrics)) [, (full grads, gathered grads)]."""
    def losses(params, toks, key):
        m = nnx.merge(gd, params)
        full = diffusion_loss(lambda x: m(x), key, toks, mask_id=MASK, **kw)
        part = diffusion_loss_gathered(m.hidden, m.logits, key, toks, mask_id=MASK, head_positions=k, **kw)
        return full, part

    def with_grads(params, toks, key):
        (full, part), vjp = jax.vjp(lambda p: losses(p, toks, key), params)
        z = jax.tree.map(jnp.zeros_like, (full[1], part[1]))
        g_full = vjp(((jnp.ones(()), z[0]), (jnp.zeros(()), z[1])))[0]
        g_part = vjp(((jnp.zeros(()), z[0]), (jnp.ones(()), z[1])))[0]
        return (full, part), (g_full, g_part)

    return jax.jit(with_grads if grads else losses)


def test_gathered_head_equals_full_loss_when_every_masked_token_fits():
    m, toks = _gathered_setup()
    gd, params = nnx.split(m)
    # every position eligible: K = L keeps every masked token of every row
    (fl, fm), (gl, gm) = _both_losses(gd, 64)(params, toks, jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(gl), float(fl), rtol=1e-6)
    for name in ("loss", "masked_ce", "masked_acc", "masked_frac"):
        np.testing.assert_allclose(float(gm[name]), float(fm[name]), rtol=1e-6, err_msg=name)
    assert float(gm["head_frac"]) == 1.0
    # task-like rows: a 6-token answer span eligible (full rows, t = 1) and 2 text rows limited to 6
    # eligible tokens: K = 6 of 64 positions is exact, also for the gradients
    elig = np.zeros((4, 64), bool)
    for i, s in enumerate((3, 20, 40, 58)):
        elig[i, s : s + 6] = True
    kw = dict(eligible=jnp.asarray(elig), full_rows=jnp.asarray([True, True, False, False]))
    f = _both_losses(gd, 6, grads=True, **kw)
    for key in range(3):
        ((fl, fm), (gl, gm)), (g_full, g_part) = f(params, toks, jax.random.PRNGKey(key))
        np.testing.assert_allclose(float(gl), float(fl), rtol=1e-6)
        for name in ("masked_ce", "masked_acc", "masked_frac"):
            np.testing.assert_allclose(float(gm[name]), float(fm[name]), rtol=1e-6, err_msg=name)
        for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_part)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    # gradients reach the embedding (head and input), the output bias and every block
    norms = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g)) for p, g in jax.tree_util.tree_leaves_with_path(g_part)}
    assert all(np.isfinite(v) for v in norms.values())
    assert all(v > 0 for n, v in norms.items() if "norm" not in n), norms


def test_gathered_head_is_unbiased():
    # 1) for a fixed mask, the subset estimate of each row's masked sum is unbiased and every masked position
    #    is kept with probability K / n_masked
    masked = jax.random.uniform(jax.random.PRNGKey(0), (3, 40)) < jnp.asarray([[0.9], [0.5], [0.1]])
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 40)) ** 2
    k = 8

    def est(key):
        idx, w = select_head_positions(key, masked, k)
        incl = jnp.zeros((3, 40)).at[jnp.arange(3)[:, None], idx].add((w > 0).astype(jnp.float32))
        return jnp.sum(w * jnp.take_along_axis(x, idx, -1), -1), incl

    n = 4000
    e, incl = jax.jit(jax.vmap(est))(jax.random.split(jax.random.PRNGKey(2), n))
    truth = np.asarray(jnp.sum(jnp.where(masked, x, 0.0), -1))
    se = np.asarray(jnp.std(e, 0)) / np.sqrt(n)
    assert np.all(np.abs(np.asarray(jnp.mean(e, 0)) - truth) < 4 * se + 1e-5), (np.asarray(jnp.mean(e, 0)), truth)
    n_m = np.asarray(masked.sum(-1))
    p = np.asarray(incl.mean(0))
    msk = np.asarray(masked)
    for r in range(3):
        want = min(1.0, k / n_m[r])
        assert np.all(np.abs(p[r][msk[r]] - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-6)
        assert np.all(p[r][~msk[r]] == 0)
    # 2) end to end on the tiny model: over many keys, the gathered loss (K = 8 of 64) minus the full loss
    #    of the same key (same mask) averages to zero
    mdl, toks = _gathered_setup(seed=1)
    gd, params = nnx.split(mdl)
    f = _both_losses(gd, 8)
    keys = jax.random.split(jax.random.PRNGKey(9), 256)
    out = jax.jit(jax.vmap(lambda kk: f(params, toks, kk)))(keys)
    (fl, _), (gl, gm) = out
    d = np.asarray(gl - fl)
    assert np.std(d) > 1e-3  # it does subsample
    assert abs(d.mean()) < 4 * d.std() / np.sqrt(len(d)), (d.mean(), d.std())
    assert float(jnp.min(gm["head_frac"])) < 0.5


def test_head_positions_option_and_train_step():
    from baatt.train import TrainConfig, build_step, make_optimizer

    assert head_positions_for(256, None) is None
    assert head_positions_for(256, 0.25) == 64 and head_positions_for(100, 0.25) == 25 and head_positions_for(10, 0.33) == 4
    assert head_positions_for(256, 64) == 64 and head_positions_for(32, 64) == 32
    for bad in (0, 0.0, 1.5, -3, True, "half"):
        with pytest.raises(ValueError, match="head_positions"):
            head_positions_for(64, bad)
        with pytest.raises(ValueError, match="head_positions"):
            TrainConfig(head_positions=bad)
    with pytest.raises(ValueError, match="head_positions"):
        build_step(None, None, MASK, 1e-3, head_positions=2.0)
    m, toks = _gathered_setup(seed=2)
    gd, params = nnx.split(m)
    tx = make_optimizer(TrainConfig())
    # at most 16 eligible tokens a row (row 0 a 3-token answer span): K = 16 of 64 is exact
    elig = (jnp.arange(64)[None, :] >= 8) & (jnp.arange(64)[None, :] < jnp.asarray([[11], [24], [24], [24]]))
    res = {}
    for hp in (None, 16):
        p = jax.tree.map(jnp.copy, params)
        step = build_step(gd, tx, MASK, 1e-3, head_positions=hp)
        p, _, met = step(p, tx.init(p), toks, elig, jax.random.PRNGKey(4))
        res[hp] = jax.device_get(met)
    for name in ("loss", "masked_ce", "masked_acc", "grad_norm"):
        np.testing.assert_allclose(res[16][name], res[None][name], rtol=1e-5, err_msg=name)
    assert res[16]["head_frac"] == 1.0 and "head_frac" not in res[None]


def test_oneshot_task_accuracy_diagnostics(monkeypatch):
    """The accuracy splits (answer length, needle depth, answer-token position) count each example in its own cell."""
    from flax import nnx

    from baatt import train as train_mod
    from baatt.data import corpus, tasks
    from baatt.data.tokenizer import get_tokenizer
    from baatt.nn import DiffusionLM, get_config

    tok, val = get_tokenizer(), corpus.load_tokens("val")
    rng = np.random.default_rng(3)
    exs = [tasks.passkey(rng, val, tok, 64) for _ in range(24)]
    lens = np.array([e.answer_end - e.answer_start for e in exs])
    assert {2, 3} <= set(lens.tolist())  # 5-digit keys are 2 or 3 GPT-2 tokens

    def oracle_for_two_token_answers(graphdef, plan):
        def f(state, x):  # the true answer where it is 2 tokens long, the mask token elsewhere
            x = np.asarray(x).copy()
            for row in x:
                hit = [e for e in exs if np.array_equal(np.where(row == 50257, e.tokens, row), e.tokens)]
                if hit and hit[0].answer_end - hit[0].answer_start == 2:
                    row[:] = hit[0].tokens
            return x
        return f

    monkeypatch.setattr(train_mod, "_argmax_fn", oracle_for_two_token_answers)
    model = DiffusionLM(get_config("tiny"), rngs=nnx.Rngs(0))
    acc, split = train_mod.task_accuracy_oneshot(model, exs, diagnostics=True)
    assert split["by_answer_tokens"] == {"2": 1.0, "3": 0.0}
    assert acc == pytest.approx(np.mean(lens == 2))
    two = lens == 2
    assert split["token_acc"]["middle"] == 0.0  # only 3-token answers have a middle token
    assert split["token_acc"]["first"] == pytest.approx(np.mean(two)) == split["token_acc"]["last"]
    third = np.array([min(int(3 * e.depths[0]), 2) for e in exs])
    assert split["by_depth"] == {str(d): pytest.approx(np.mean(two[third == d])) for d in sorted(set(third.tolist()))}
    assert train_mod.task_accuracy_oneshot(model, exs) == acc


def test_recipe_estimates_from_the_block_being_decoded(model, monkeypatch):
    """estimate_from="block": the first sparse step of every decoding block estimates, from the positions of that
    block (one to the left under shifted logits), and the later steps of the block reuse that selection."""
    import baatt

    seen, real = [], baatt.attention

    def spy(q, k, v, **kw):
        seen.append((kw.get("query_positions"), kw.get("selection") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(baatt, "attention", spy)
    x = _canvas(b=2, prompt=40, gen=24, seed=9)
    plan = AttentionPlan.ba(BAConfig(selector="last_query", block_size=16, sparsity=0.5), implementation="reference")
    with jax.disable_jit():
        r = generate(model, x, steps=6, block_length=8, plan=plan, reuse_every=None, estimate_from="block",
                     dense_warmup=1)
    # block 0 (steps 0-1) starts dense, so its first sparse step (1) estimates; blocks 1 and 2 estimate at 2 and 4
    assert r.step_kind == ["dense", "estimate", "estimate", "reuse", "estimate", "reuse"]
    layers = CFG.num_layers
    assert len(seen) == 5 * layers
    for step, block in ((1, 0), (2, 1), (4, 2)):
        for given, reused in seen[(step - 1) * layers: step * layers]:
            assert not reused and np.array_equal(np.asarray(given), np.tile(np.arange(40, 48) + 8 * block, (2, 1)))
    assert all(given is None and reused for given, reused in seen[2 * layers: 3 * layers] + seen[4 * layers:])
    assert generate(model, x, steps=6, block_length=8, plan=plan, reuse_every=None,
                    estimate_from="block").step_kind == ["estimate", "reuse"] * 3
    assert not np.any(r.tokens == MASK)

    # With reuse_every, a block is also re-estimated inside itself, from its own positions again.
    seen.clear()
    with jax.disable_jit():
        r = generate(model, x, steps=6, block_length=12, plan=plan, reuse_every=2, estimate_from="block")
    assert r.step_kind == ["estimate", "reuse", "estimate"] * 2
    for step, block in ((0, 0), (2, 0), (3, 1), (5, 1)):
        for given, reused in seen[step * layers: (step + 1) * layers]:
            assert not reused and np.array_equal(np.asarray(given), np.tile(np.arange(40, 52) + 12 * block, (2, 1)))

    shifted = DiffusionLM(dataclasses.replace(CFG, shift_logits=True), rngs=nnx.Rngs(0))
    seen.clear()
    with jax.disable_jit():
        generate(shifted, x, steps=3, block_length=8, plan=plan, estimate_from="block")
    assert np.array_equal(np.asarray(seen[0][0]), np.tile(np.arange(39, 47), (2, 1)))
    # block_context: the positions just before the block join its queries (shifted one left as well).
    seen.clear()
    with jax.disable_jit():
        generate(shifted, x, steps=3, block_length=8, plan=plan, estimate_from="block", block_context=5)
    for block in range(3):
        want = np.concatenate([np.arange(35, 40), np.arange(40, 48)]) + 8 * block - 1
        assert np.array_equal(np.asarray(seen[block * layers][0]), np.tile(want, (2, 1)))

    with pytest.raises(ValueError, match="block_context must be smaller than the prompt"):
        generate(model, x, steps=3, block_length=8, plan=plan, estimate_from="block", block_context=40)
    with pytest.raises(ValueError, match="block_context must be an int >= 0"):
        generate(model, x, steps=3, block_length=8, plan=plan, estimate_from="block", block_context=-1)
    with pytest.raises(ValueError, match="it needs estimate_from='block'"):
        generate(model, x, steps=3, block_length=8, plan=plan, block_context=4)
    with pytest.raises(ValueError, match="estimate_from must be 'canvas' or 'block'"):
        generate(model, x, steps=3, block_length=8, plan=plan, estimate_from="active")
    with pytest.raises(ValueError, match="estimate_from='block' needs a BA-Att plan"):
        generate(model, x, steps=3, block_length=8, estimate_from="block")
    with pytest.raises(ValueError, match="layer 0's selector 'baatt' estimates from queries of its own choice"):
        generate(model, x, steps=3, block_length=8, plan=AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5)),
                 estimate_from="block")
