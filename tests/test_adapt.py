"""Masked-diffusion adaptation of a causal LM (baatt.adapt), on a tiny random GGUF written on the fly.

What SmolLM2's adaptation needs, at a size a CPU trains in seconds: the model changes (mask
token, bidirectional attention, shifted logits), the scanned blocks matching the plain model,
a training step that learns, a checkpoint that resumes, the GGUF split / join for transfers,
and the experiment's smoke run end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baatt import adapt
from baatt.config import BAConfig
from baatt.data import tasks
from baatt.data.gguf_tokenizer import GGUFTokenizer
from baatt.nn import AttentionPlan, DiffusionLM, load_gguf
from baatt.train import build_step, make_optimizer, restore_weights, train
from experiments import adapt_smollm2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(causal config, causal model, tokenizer, GGUF path) of the smoke GGUF."""
    path = adapt_smollm2.write_smoke_gguf(tmp_path_factory.mktemp("gguf") / "smoke.gguf")
    cfg, model = load_gguf(path, progress=False)
    return cfg, model, GGUFTokenizer(path), path


@pytest.fixture(scope="module")
def streams(smoke):
    """Train / val streams of synthetic sentences in the smoke tokenizer (no corpus needed)."""
    tokenizer = smoke[2]
    rng = np.random.default_rng(0)

    def text(n):
        words = rng.choice(tasks._NOUN + tasks._ADJ, size=n)
        return " ".join(w + ("." if i % 9 == 8 else "") for i, w in enumerate(words))

    return (np.asarray(tokenizer.encode(text(3000)), np.uint16), np.asarray(tokenizer.encode(text(1500)), np.uint16))


def test_adapt_for_diffusion_adds_mask_token(smoke):
    cfg, causal, _, _ = smoke
    model = adapt.adapt_for_diffusion(causal)
    new = model.cfg
    assert isinstance(model, adapt.ScannedDiffusionLM)
    assert (new.mask_id, new.vocab_size % adapt.VOCAB_MULTIPLE, new.causality, new.shift_logits) == (
        cfg.vocab_size, 0, "bidirectional", True)
    assert new.vocab_size > cfg.vocab_size and new.tie_embeddings
    old, table = np.asarray(causal.embed.embedding[...]), np.asarray(model.embed.embedding[...])
    np.testing.assert_array_equal(table[: cfg.vocab_size], old)
    np.testing.assert_allclose(table[new.mask_id], old.mean(axis=0), atol=1e-7)
    assert not np.any(table[new.mask_id + 1:])
    up = [np.asarray(m.blocks[1].mlp.up.kernel[...]) for m in (model, causal)]
    np.testing.assert_array_equal(*up)
    with pytest.raises(ValueError, match="must not have a mask token yet"):
        adapt.adapt_for_diffusion(model)


def test_layer_runs():
    base = BAConfig(block_size=64, sparsity=0.5)
    assert adapt.layer_runs(AttentionPlan.dense(), 30) == [(0, 30)]
    assert adapt.layer_runs(AttentionPlan.ba(base), 4) == [(0, 4)]
    first_last = AttentionPlan.ba(base, compensate_layers=("first", "last"))
    assert adapt.layer_runs(first_last, 30) == [(0, 1), (1, 29), (29, 30)]
    per_layer = AttentionPlan(kind="ba", layer_configs=(None, base, base, None))
    assert adapt.layer_runs(per_layer, 4) == [(0, 1), (1, 3), (3, 4)]


def test_scanned_model_matches_plain_model_and_shifts(smoke):
    model = adapt.adapt_for_diffusion(smoke[1])
    plain = DiffusionLM(model.cfg, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, smoke[0].vocab_size, (1, 128)), jnp.int32)
    # compensation in the last layer only: two runs of layers, each its own scan
    plan = AttentionPlan.ba(BAConfig(block_size=32, sparsity=0.5, beta=1.0), compensate_layers=("last",),
                            implementation="reference")
    forward = nnx.jit(lambda m, x, p: m(x, attention=p, return_aux=True), static_argnums=2)
    for p in (AttentionPlan.dense(), plan):
        (got, aux), (want, want_aux) = forward(model, tokens, p), forward(plain, tokens, p)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        np.testing.assert_allclose(np.asarray(aux["density"]), np.asarray(want_aux["density"]))
        assert len(aux["selections"]) == model.cfg.num_layers
    # gradients too: the scan is what training differentiates
    grads = [nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(m) for m in (model, plain)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # shifted logits: position i reads position i - 1's state, position 0 its own
    unshifted = DiffusionLM(model.cfg.replace(shift_logits=False), rngs=nnx.Rngs(0))
    nnx.update(unshifted, nnx.state(model))
    h, h0 = np.asarray(model.hidden(tokens)), np.asarray(unshifted.hidden(tokens))
    np.testing.assert_allclose(h[:, 1:], h0[:, :-1], atol=1e-5)
    np.testing.assert_allclose(h[:, 0], h0[:, 0], atol=1e-5)


def test_train_step_lowers_the_loss_on_a_repeated_batch(smoke, streams):
    model = adapt.adapt_for_diffusion(smoke[1])
    cfg = adapt.PRESETS["cpu_smoke"]
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    step = build_step(graphdef, tx, model.cfg.mask_id, cfg.eps)
    tokens = jnp.asarray(np.stack([streams[0][:128], streams[0][128:256]]), jnp.int32)
    eligible = jnp.ones(tokens.shape, bool)
    key = jax.random.PRNGKey(0)  # the same masks every step
    losses = []
    for _ in range(4):
        params, opt_state, metrics = step(params, opt_state, tokens, eligible, key)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_checkpoint_resumes_to_the_same_weights(smoke, streams, tmp_path):
    causal, tokenizer = smoke[1], smoke[2]
    cfg = dataclasses.replace(adapt.PRESETS["cpu_smoke"], steps=2, ckpt_dir=str(tmp_path / "ck"), ckpt_every=1)
    kw = dict(tokenizer=tokenizer, train_stream=streams[0], val_stream=streams[1], log_fn=lambda _: None)
    first = train(cfg, model=adapt.adapt_for_diffusion(causal), **kw)
    assert first["steps"] == 2 and all(np.isfinite(h["loss"]) for h in first["history"] if "loss" in h)
    saved = nnx.to_pure_dict(nnx.state(first["model"]))
    # resumed at its last step: nothing left to train, same weights
    again = train(cfg, model=adapt.adapt_for_diffusion(causal), **kw)
    assert again["steps"] == 2 and not [h for h in again["history"] if "loss" in h]
    jax.tree.map(np.testing.assert_array_equal, saved, nnx.to_pure_dict(nnx.state(again["model"])))
    # the weights load into a freshly adapted model
    fresh = adapt.adapt_for_diffusion(causal)
    assert restore_weights(fresh, cfg.ckpt_dir) == 2
    jax.tree.map(np.testing.assert_array_equal, saved, nnx.to_pure_dict(nnx.state(fresh)))
    # a longer run goes on from step 2
    longer = train(dataclasses.replace(cfg, steps=3), model=adapt.adapt_for_diffusion(causal), **kw)
    assert longer["steps"] == 3 and [h["step"] for h in longer["history"] if "loss" in h] == [3]


def test_generation_benchmark_on_the_adapted_checkpoint(smoke, streams, tmp_path):
    """bench_generation --gguf: the GGUF adapted to diffusion with the trained weights restored, prompts in the
    GGUF's tokens, passkey rows only up to the length trained at."""
    from experiments import bench_generation

    causal, tokenizer, path = smoke[1], smoke[2], smoke[3]
    ckpt = tmp_path / "ck"
    train(dataclasses.replace(adapt.PRESETS["cpu_smoke"], steps=1, ckpt_dir=str(ckpt)),
          model=adapt.adapt_for_diffusion(causal), tokenizer=tokenizer, train_stream=streams[0],
          val_stream=streams[1], log_fn=lambda _: None)
    argv = ["--preset", "cpu_smoke", "--gguf", str(path), "--ckpt-dir", str(ckpt), "--recipes", "dense", "every_step",
            "--selector", "pooled_query", "--prompt-lengths", "256", "512", "--passkey-examples", "1",
            "--max-documents", "40", "--out", str(tmp_path / "out")]
    result = bench_generation.main(argv)
    assert result["weights"] == f"{path.name} adapted to diffusion, checkpoint {ckpt} (step 1)"
    assert result["max_len"] == 512 and result["selector"] == "pooled_query"
    rows = {(r["prompt_length"], r["recipe"]): r for r in result["rows"]}
    assert list(rows) == [(256, "dense"), (256, "every_step"), (512, "dense"), (512, "every_step")]
    assert all(0.0 <= rows[256, name]["passkey"] <= 1.0 for name in ("dense", "every_step"))
    assert all("passkey" not in rows[512, name] for name in ("dense", "every_step"))  # 512 + 32 > 512
    assert rows[256, "every_step"]["mean_density"] < 1.0 and rows[256, "dense"]["nll"] > 0
    table = (tmp_path / "out" / "bench_generation_cpu_smoke.md").read_text()
    assert "selector pooled_query" in table and "| 512 | dense |" in table and table.count("| - | - |") == 2
    # a GGUF that is not there is named
    with pytest.raises(FileNotFoundError, match="--gguf: no file at"):
        bench_generation.main(["--preset", "cpu_smoke", "--gguf", str(tmp_path / "missing.gguf")])


def test_train_refuses_workers_with_a_gguf_tokenizer(smoke, streams):
    cfg = dataclasses.replace(adapt.PRESETS["cpu_smoke"], batch_workers=2)
    with pytest.raises(ValueError, match="batch_workers must be 0"):
        train(cfg, model=adapt.adapt_for_diffusion(smoke[1]), tokenizer=smoke[2], train_stream=streams[0],
              val_stream=streams[1])


def test_task_examples_in_a_gguf_tokenizer(smoke, streams):
    tokenizer = smoke[2]
    ex = tasks.passkey(np.random.default_rng(0), streams[1], tokenizer, 512, depth=0.5)
    assert ex.tokens.size == 512 and tokenizer.decode(ex.answer_tokens) == ex.answer
    hay = ex.tokens[: ex.needle_spans[0][0]]
    assert tokenizer.decode(hay[-1:]).endswith(".")  # the needle goes after a sentence end


def test_token_streams_cache(smoke, tmp_path):
    tokenizer = smoke[2]
    built = adapt.token_streams(tokenizer, cache_dir=tmp_path, max_documents=2)
    read = adapt.token_streams(tokenizer, cache_dir=tmp_path)
    np.testing.assert_array_equal(built.val, read.val)
    assert (read.val_documents, read.val_text_bytes) == (2, built.val_text_bytes)
    sep = adapt.separator_id(tokenizer)
    assert int(np.sum(np.asarray(read.val) == sep)) == 2 and read.val[-1] == sep
    assert json.loads((tmp_path / "stats.json").read_text())["tokenizer"] == "smoke.gguf"
    assert built.val_bytes_per_token == pytest.approx(built.val_text_bytes / (built.val.size - 2))


def test_split_and_join_gguf(tmp_path):
    data = tmp_path / "data"
    gguf = data / "models" / "model.gguf"
    gguf.parent.mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(3 << 20)
    gguf.write_bytes(payload)
    env = dict(os.environ, BAATT_DATA_DIR=str(data), PART1_MIB="1")
    script = str(ROOT / "scripts" / "split_gguf.sh")
    subprocess.run(["bash", script, "split", str(gguf)], env=env, check=True, capture_output=True)
    assert (data / "carry" / "model.gguf.part1").stat().st_size == 1 << 20
    gguf.unlink()
    subprocess.run(["bash", script, "join", str(gguf)], env=env, check=True, capture_output=True)
    assert gguf.read_bytes() == payload
    gguf.unlink()
    with open(data / "carry" / "model.gguf.part2", "ab") as f:
        f.write(b"x")
    bad = subprocess.run(["bash", script, "join", str(gguf)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "sha256" in bad.stderr and not gguf.exists()


def test_smoke_experiment(tmp_path):
    res = adapt_smollm2.main(["--preset", "cpu_smoke", "--selectors", "meanpool", "--tails", "none", "pooled",
                              "--out", str(tmp_path)])
    assert res["training"]["steps"] == 3 and np.isfinite(res["causal_reference"]["nll"])
    assert [(r["length"], r["variant"]) for r in res["rows"]] == [
        (512, "dense"), (512, "meanpool@0.5"), (512, "meanpool+tail@0.5")]
    assert all("error" not in r and np.isfinite(r["nll"]) for r in res["rows"])
    assert res["rows"][1]["density"] == pytest.approx(0.5) and res["before_training"][0]["step"] == 0
    # The tail row keeps the same blocks and adds the dropped ones' pooled terms: same density, other NLL.
    assert res["rows"][2]["density"] == res["rows"][1]["density"] and res["rows"][2]["nll"] != res["rows"][1]["nll"]
    table = (tmp_path / "smollm2_dlm_cpu_smoke.md").read_text()
    assert "| 512 | meanpool@0.5 | 0.500 |" in table and "dense (step 0)" in table
    assert "| meanpool+tail |" in table  # the pivot tables keep the tail rows apart
    assert json.loads((tmp_path / "smollm2_dlm_cpu_smoke.json").read_text())["device"]


def test_calibration_study_on_the_adapted_checkpoint(smoke, streams, tmp_path, monkeypatch):
    """selection_budgets --ckpt-dir --parts a: the adapted model's Q/K/V (trained weights restored), per-head
    budgets calibrated and judged, the budgets saved; parts not asked for are left out of results and table."""
    from baatt.selection.calibrate import Budgets
    from experiments import selection_budgets

    causal, tokenizer, path = smoke[1], smoke[2], smoke[3]
    ckpt = tmp_path / "ck"
    train(dataclasses.replace(adapt.PRESETS["cpu_smoke"], steps=1, ckpt_dir=str(ckpt)),
          model=adapt.adapt_for_diffusion(causal), tokenizer=tokenizer, train_stream=streams[0],
          val_stream=streams[1], log_fn=lambda _: None)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "doc.txt").write_text(tokenizer.decode(streams[1][:1200].tolist()))
    monkeypatch.setenv("BAATT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(adapt_smollm2, "smollm2_gguf", lambda: path)
    out = tmp_path / "out"
    result = selection_budgets.main(["--ckpt-dir", str(ckpt), "--parts", "a", "--text", "doc.txt", "--length", "256",
                                     "--eval-start", "256", "--layers", "0", "1", "--block-size", "32",
                                     "--out", str(out)])
    assert result["meta"]["model"] == f"{path.name} adapted to diffusion, checkpoint {ckpt} (step 1)"
    assert result["spaces"] is None and result["guard"] is None
    a = result["budgets"]
    assert [r["layer"] for r in a["per_layer"]] == [0, 1] and all(len(r["counts"]) == 4 for r in a["per_layer"])
    assert 0.0 < a["summary"]["calibrated"]["density"] <= 1.0 and a["summary"]["calibrated"]["mass"] > 0.5
    saved = Budgets.load(out / "budgets.json")
    assert saved.head_counts(1).tolist() == a["per_layer"][1]["counts"]
    table = (out / "table.md").read_text()
    assert "## (a) Per-head budgets" in table and "## (b)" not in table and "## (c)" not in table
