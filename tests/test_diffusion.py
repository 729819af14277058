"""Masked diffusion: forward process, loss, the LLaDA sampler, and a tiny CPU training run."""

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
