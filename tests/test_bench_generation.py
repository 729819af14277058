"""experiments/bench_generation.py in its CPU smoke preset: every recipe, speed rows at random init, and the
quality columns with a (one-step) checkpoint."""

from __future__ import annotations

import json

import pytest

from experiments import bench_generation


def test_bench_generation_smoke_random_init(tmp_path):
    result = bench_generation.main(["--preset", "cpu_smoke", "--out", str(tmp_path)])
    rows = {row["recipe"]: row for row in result["rows"]}
    assert list(rows) == list(bench_generation.RECIPE_NAMES)
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["mean_density"] == 1.0
    assert rows["dense"]["step_kinds"] == dict(dense=4, estimate=0, reuse=0)
    assert rows["every_step"]["step_kinds"] == dict(dense=0, estimate=4, reuse=0)
    assert rows["reuse"]["step_kinds"] == dict(dense=1, estimate=1, reuse=2)  # 20% of 4 steps: one dense
    assert rows["refresh"]["step_kinds"] == dict(dense=1, estimate=2, reuse=1)  # re-estimated after 2 sparse steps
    assert rows["block"]["step_kinds"] == dict(dense=0, estimate=2, reuse=2)  # 2 decoding blocks of 2 steps each
    assert rows["block_refresh"]["step_kinds"] == dict(dense=0, estimate=2, reuse=2)  # 2 steps a block: no refresh
    for name in ("every_step", "reuse", "split", "reuse_tail", "block", "block_refresh"):
        assert rows[name]["mean_density"] < 1.0 and rows[name]["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "bench_generation_cpu_smoke.json").read_text())
    assert saved["device"] == "cpu" and not saved["quality"] and "random-init" in saved["notes"][0]
    table = (tmp_path / "bench_generation_cpu_smoke.md").read_text()
    assert "| 256 | split |" in table and "| passkey acc |" not in table
    # The block recipe estimates from given queries: its own selector when --selector takes none, named in the row.
    assert rows["dense"]["selector"] is None and rows["split"]["selector"] == saved["selector"]
    assert saved["selector"] == "baatt" and rows["block"]["selector"] == "last_query"
    assert "| 256 | block (last_query) |" in table


def test_bench_generation_smoke_with_a_checkpoint(tmp_path):
    from baatt.data import corpus
    from baatt.train import TrainConfig, train

    val = corpus.load_tokens("val")
    ckpt = tmp_path / "ck"
    train(TrainConfig(model="tiny", model_overrides=(("max_len", 512),), stages=((1.0, 32, 2),), steps=1,
                      warmup_steps=1, eval_every=0, ckpt_dir=str(ckpt), progress=False),
          train_stream=val, val_stream=val, log_fn=lambda s: None)
    result = bench_generation.main(["--preset", "cpu_smoke", "--ckpt-dir", str(ckpt), "--recipes", "dense", "split",
                                    "every_step", "--dense-warmup", "0.5", "--out", str(tmp_path / "out")])
    assert result["quality"] and result["weights"].startswith(f"checkpoint {ckpt}")
    rows = {row["recipe"]: row for row in result["rows"]}
    for row in rows.values():
        assert 0.0 <= row["passkey"] <= 1.0 and row["nll"] > 0
    # Who wrote the answer: dense steps only, sparse steps only, and under split the first block's two steps
    # split between them (a warm-up of 2 of the 4 steps).
    assert rows["dense"]["passkey_sparse_share"] == 0.0 and rows["every_step"]["passkey_sparse_share"] == 1.0
    assert rows["split"]["step_kinds"] == dict(dense=2, estimate=1, reuse=1)
    assert 0.0 <= rows["split"]["passkey_sparse_share"] <= 1.0
    assert all(len(row["passkey_samples"]) == 2 and set(row["passkey_samples"][0]) == {"answer", "generated"}
               for row in rows.values())
    assert "answer from sparse steps" in (tmp_path / "out" / "bench_generation_cpu_smoke.md").read_text()
    # Per-prompt hits, and each recipe against dense on the same prompts.
    dense_hits = rows["dense"]["passkey_hits"]
    assert "passkey_vs_dense" not in rows["dense"]
    for row in rows.values():
        assert len(row["passkey_hits"]) == len(dense_hits) > 0 and set(row["passkey_hits"]) <= {0, 1}
        assert row["passkey"] == sum(row["passkey_hits"]) / len(row["passkey_hits"])
    for name in ("split", "every_step"):
        paired = rows[name]["passkey_vs_dense"]
        assert paired == bench_generation.paired_with_dense(rows[name]["passkey_hits"], dense_hits)
        assert paired["points"] == pytest.approx(100 * (rows[name]["passkey"] - rows["dense"]["passkey"]))
    assert "passkey vs dense: lost / gained (points)" in (tmp_path / "out" / "bench_generation_cpu_smoke.md").read_text()


def test_paired_with_dense_counts_each_prompt_once():
    paired = bench_generation.paired_with_dense([1, 0, 0, 1, 1], [1, 1, 0, 0, 1])
    assert paired == dict(lost=1, gained=1, points=0.0)  # prompt 1 lost, prompt 3 gained: the same accuracy
    assert bench_generation.paired_with_dense([0, 0, 0, 0], [1, 1, 0, 1]) == dict(lost=3, gained=0, points=-75.0)
    with pytest.raises(ValueError, match="hits: one per dense prompt"):
        bench_generation.paired_with_dense([1, 0], [1, 0, 1])


def test_block_refresh_is_the_block_recipe_re_estimated_every_refresh_every_steps():
    cfg = bench_generation.get_config("cpu_smoke", refresh_every=3, block_warmup=1, block_context=16)
    recipes = bench_generation.recipes(cfg)
    (block_plan, block), (refresh_plan, refresh) = recipes["block"], recipes["block_refresh"]
    assert refresh_plan == block_plan and block_plan.config.selector == "last_query"
    assert block == dict(dense_warmup=1, reuse_every=None, estimate_from="block", block_context=16)
    assert refresh == dict(block, reuse_every=3)
