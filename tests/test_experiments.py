"""The experiments: the main job end to end at a small size (on synthetic and on saved Q/K), the
shared harness (command-line configuration, run records), and each study's CPU-sized checks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import baatt
import baatt.diffusion  # registers "prompt_gen": the selector list must not depend on test order
from baatt import reference, synthetic
from baatt.diffusion import PromptGenParams
from baatt.selection import block_map
from experiments import approx_error


def test_approx_error_study_small(tmp_path):
    out = tmp_path / "ae"
    res = approx_error.main(["--length", "512", "--heads", "2", "--head-dim", "32", "--block-size", "32",
                             "--sparsities", "0.5", "0.9", "--out", str(out)])
    for name in ("results.json", "table.md", "selectors.png", "ablation.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["jax_version"]
    rows = {(r["name"], r["sparsity"]): r for r in res["selectors"]}
    for s in (0.5, 0.9):
        assert rows[("oracle", s)]["recall"] == pytest.approx(1.0, abs=1e-6)
        assert rows[("random", s)]["mass"] < rows[("oracle", s)]["mass"]
        for r in res["selectors"] + res["ablation"]:
            assert 0.0 <= r["mass"] <= 1.0 + 1e-6 and 0.0 <= r["recall"] <= 1.0 + 1e-6
    assert len(res["ablation"]) == 2 * 4 * 3
    assert len(res["bound"]) == 4 and all(-1 <= r["pearson"] <= 1 for r in res["bound"])
    table = (out / "table.md").read_text()
    assert "| oracle |" in table and "sort Q+K / beta 0.5" in table


def test_approx_error_accepts_saved_qk(tmp_path):
    q, k, _ = synthetic.attention_inputs(synthetic.SyntheticConfig(length=256, q_heads=2, kv_heads=2, head_dim=16))
    path = tmp_path / "qk.npz"
    np.savez(path, q=np.asarray(q), k=np.asarray(k))
    res = approx_error.main(["--qk", str(path), "--block-size", "32", "--sparsities", "0.5", "--out", str(tmp_path / "o")])
    assert res["meta"]["source"] == "qk.npz" and res["meta"]["shape"] == [1, 256, 2, 16]
    bad = tmp_path / "bad.npz"
    np.savez(bad, q=np.asarray(q))
    with pytest.raises(ValueError, match="must hold arrays 'q' and 'k'"):
        synthetic.load_qkv(str(bad))


@pytest.mark.parametrize("selector", baatt.SELECTORS)
def test_block_maps_are_distributions(selector):
    q, k, _ = synthetic.attention_inputs(synthetic.SyntheticConfig(length=200, q_heads=2, kv_heads=1, head_dim=16))
    cfg = baatt.BAConfig(block_size=32, sparsity=0.5)
    if selector == "prompt_gen":  # its budgets live in its params, per key region
        cfg = baatt.BAConfig(block_size=32, selector="prompt_gen",
                             selector_params=PromptGenParams(prompt_length=96, prompt_sparsity=0.5, gen_sparsity=0.5))
    m = np.asarray(block_map(q, k, cfg, selector=selector))
    assert m.shape == (1, 2, 7, 7)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    assert np.all(m >= 0)
    if selector == "oracle":
        np.testing.assert_allclose(m, reference.post_downsample_map(q, k, block_size=32), atol=1e-6)
    if selector == "baatt":
        scores = np.asarray(reference.pre_downsample_scores(q, k, cfg), np.float64)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(m, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_synthetic_inputs_have_structure():
    q, k, v = synthetic.attention_inputs(synthetic.SyntheticConfig(length=2048, q_heads=2, kv_heads=2))
    m = np.asarray(reference.post_downsample_map(q, k, block_size=128))
    top_half = np.sort(m, -1)[..., ::-1][..., :8].sum(-1).mean()
    assert top_half > 0.8, "attention should concentrate on a minority of blocks"
    norms = np.linalg.norm(np.asarray(k), axis=-1)
    assert norms.max() / np.median(norms) > 3, "key norms should be heavy-tailed"
    with pytest.raises(ValueError, match="kv_heads must divide q_heads"):
        synthetic.attention_inputs(synthetic.SyntheticConfig(q_heads=3, kv_heads=2))


def test_train_dlm_presets_are_valid():
    from experiments import train_dlm

    for name in train_dlm.PRESETS:
        cfg = train_dlm.get_config(name).train
        assert max(s[1] for s in cfg.stages) <= cfg.model_config().max_len
    pk = train_dlm.get_config("gpu_passkey").train
    assert pk.model_config().output_bias and pk.task_kinds == ("passkey",) and pk.eval_len == 4096
    assert pk.stages[-1][1] == 4096 and pk.time_budget_s <= 330
    fast = train_dlm.get_config("gpu_passkey_fast").train
    assert fast.model_config().output_bias and fast.task_kinds == ("passkey",) and fast.task_fraction == 0.4
    assert [s[1] for s in fast.stages] == [256, 1024, 4096]
    assert 0.25 <= fast.head_positions <= 0.5 and fast.time_budget_s <= 400
    cur = train_dlm.get_config("gpu_passkey_curriculum").train
    assert cur.stages[0][1] <= 256 and cur.stages[0][3] >= 0.75  # retrieval first, on short rows
    assert cur.stages[-1][1] == 4096 and cur.time_budget_s <= 450  # the training process stays under 8 minutes
    p4k = train_dlm.get_config("gpu_passkey_4k").train
    assert p4k.stages[-1][1] == 4096 and p4k.stages[-1][0] - p4k.stages[-2][0] >= 0.5 and p4k.time_budget_s <= 450
    assert all(s[3] >= 0.9 for s in p4k.stages)
    dig = train_dlm.get_config("gpu_passkey_digits").train
    assert dig.passkey_digits[0] <= 5 <= 8 <= dig.passkey_digits[1] and dig.stages == p4k.stages
    qs, mid = train_dlm.get_config("gpu_passkey_questions").train, train_dlm.get_config("gpu_passkey_middle").train
    assert qs.stages == mid.stages == p4k.stages and qs.passkey_question_every == mid.passkey_question_every == 512
    assert qs.passkey_middle_share is None and mid.passkey_middle_share == 0.7 and mid.passkey_digits == (5, 5)
    assert all(train_dlm.get_config(n).train.head_positions is None for n in ("cpu_tiny", "gpu_small", "gpu_small_tasks", "gpu_passkey"))
    gated = train_dlm.get_config("gpu_passkey_gated").train
    assert [s[1] for s in gated.stages] == [128, 512, 1024, 4096] and 0.5 <= gated.stage_gate <= 1.0
    assert gated.passkey_middle_share == mid.passkey_middle_share and gated.time_budget_s == mid.time_budget_s
    conv = train_dlm.get_config("gpu_passkey_conv").train
    assert conv.model_config().short_conv >= 2 and conv.model_config().output_bias and conv.stages == gated.stages
    niah = train_dlm.get_config("gpu_passkey_conv_niah").train
    assert "multikey_niah" in niah.task_kinds and "passkey" in niah.task_kinds
    assert dataclasses.replace(niah, task_kinds=conv.task_kinds) == conv
    assert all(train_dlm.get_config(n).train.stage_gate is None for n in train_dlm.PRESETS
               if n not in ("gpu_passkey_gated", "gpu_passkey_conv", "gpu_passkey_conv_niah"))


def test_eval_dlm_variants_cover_the_registry():
    """The four named recipes, then every other registered selector (dense aside) once per sparsity, and
    last_query with 32 queries."""
    import baatt
    from experiments import eval_dlm
    from experiments.selector_flops import flop_fraction

    vs = eval_dlm.variants((0.5, 0.9), 64, None)
    others = [n for n in baatt.SELECTORS if n not in ("dense", "baatt", "meanpool", "xattention")]
    assert {"last_query", "pooled_query", "oracle", "max_oracle"} <= set(others)
    for name in others:
        for s in (0.5, 0.9):
            plan = vs[f"{name}@{s}"]
            assert plan.config.selector == name and plan.config.sparsity == s and plan.config.block_size == 64
    assert vs["baatt@0.5"].config.sort_q and vs["xattention@0.9"].config.selector == "xattention"
    for s in (0.5, 0.9):  # last_query with 32 queries: under 1% of dense FLOPs from 2K tokens on
        cfg = vs[f"last_query_q32@{s}"].config
        assert (cfg.selector, cfg.sparsity, cfg.last_query_size) == ("last_query", s, 32)
        assert flop_fraction(cfg, length=2048, q_heads=8, kv_heads=8) < 0.01
    assert flop_fraction(vs["last_query@0.5"].config, length=2048, q_heads=8, kv_heads=8) > 0.01
    assert len(vs) == 1 + 2 * (4 + len(others)) + 2


def test_eval_dlm_only_runs_the_named_variants_in_the_order_named():
    """--only picks by prefix and orders by the prefixes (the time budget then skips the last named); a variant
    two prefixes match comes once, at the first; a prefix of nothing (a typo) is refused, naming the variants."""
    from experiments import eval_dlm

    vs = eval_dlm.variants((0.5, 0.9), 64, None)
    picked = list(eval_dlm.only_variants(vs, ("dense", "last_query@", "oracle@", "xattention", "last_query@0.9")))
    assert picked == ["dense", "last_query@0.5", "last_query@0.9", "oracle@0.5", "oracle@0.9",
                      "xattention@0.5", "xattention@0.9"]
    assert list(eval_dlm.only_variants(vs, ("meanpool@0.9", "dense"))) == ["meanpool@0.9", "dense"]
    with pytest.raises(ValueError, match="--only: 'last_querry@' is the prefix of no variant; the variants are dense, "):
        eval_dlm.only_variants(vs, ("dense", "last_querry@"))


def test_eval_dlm_merges_per_length_results(tmp_path):
    import json

    from experiments import eval_dlm

    base = dict(device="gpu:x", jax_version="0.11.2", commit="abc", date="d", model="small", step=10, block_size=128,
                implementation="auto", num_examples=2)
    rows = [dict(length=l, variant="dense", density=1.0, nll=5.0, passkey=1.0, multikey_niah=0.5) for l in (2048, 4096)]
    for i, row in enumerate(rows):
        (tmp_path / f"r{i}.json").write_text(json.dumps(dict(base, rows=[row], notes=[f"n{i}"], seconds=i)))
    out = eval_dlm.main(["--merge", str(tmp_path / "r0.json"), str(tmp_path / "r1.json"), "--out", str(tmp_path / "o"),
                         "--name", "m"])
    assert [r["length"] for r in out["rows"]] == [2048, 4096] and out["notes"] == ["n0", "n1"]
    md = (tmp_path / "o" / "m.md").read_text()
    assert "| 2048 | dense |" in md and "| 4096 | dense |" in md
    (tmp_path / "r2.json").write_text(json.dumps(dict(base, step=11, rows=[], notes=[])))
    with pytest.raises(ValueError, match="one checkpoint"):
        eval_dlm.main(["--merge", str(tmp_path / "r0.json"), str(tmp_path / "r2.json"), "--out", str(tmp_path / "o")])


def test_train_dlm_stage_flag():
    from experiments.train_dlm import parse_stage

    assert parse_stage("1.0:256:128:0.8") == (1.0, 256, 128, 0.8) and parse_stage("0.5:64:2") == (0.5, 64, 2)
    with pytest.raises(ValueError, match="END:LEN:BATCH"):
        parse_stage("1.0:256")
    with pytest.raises(ValueError, match="with numbers"):
        parse_stage("1.0:x:2")


def test_dlm_experiment_script_trains_evaluates_and_merges(tmp_path):
    """scripts/dlm_experiment.sh end to end on CPU: tiny preset, two lengths evaluated in parallel, one merged table."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, LENGTHS="256 320", CKPT_DIR=str(tmp_path / "ck"),
               EVAL_ARGS="--only dense last_query@ --sparsities 0.5 --num-examples 1 --nll-seqs 1 --batch 1 "
                         "--block-size 64")
    r = subprocess.run(["bash", str(root / "scripts/dlm_experiment.sh"), "cpu_tiny", str(tmp_path / "out"), "--steps", "3"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "out" / "dlm_eval_cpu_tiny.md").read_text()
    assert "| 256 | dense |" in md and "| 320 | dense |" in md and "| 320 | last_query@0.5 |" in md
    assert (tmp_path / "out" / "dlm_train_cpu_tiny.json").exists()
    import json

    for row in json.loads((tmp_path / "out" / "dlm_eval_cpu_tiny.json").read_text())["rows"]:
        for task in ("passkey", "multikey_niah"):  # every example counted once, in its answer length's cell
            split = row[f"{task}_by_answer_tokens"]
            assert sum(c["n"] for c in split.values()) == 1
            assert row[task] == sum(c["acc"] * c["n"] for c in split.values())


def test_bench_estimator_cpu_smoke_with_parts(tmp_path, monkeypatch):
    """The estimator benchmark runs end to end on a CPU (XLA dense baseline) and reports every part."""
    from baatt.selection import sorting
    from experiments import bench_estimator

    monkeypatch.setattr(sorting, "ROW_ARGSORT", sorting.ROW_ARGSORT)  # the run sets it; restored afterwards
    res = bench_estimator.main(["--out", str(tmp_path), "--lengths", "256", "--sparsities", "0.5",
                                "--dense-impl", "xla", "--impl", "reference", "--name", "est",
                                "--row-argsort", "segmented"])
    rows = res["rows"]
    assert [r["variant"] for r in rows] == list(bench_estimator.VARIANTS)
    assert res["meta"]["row_argsort"] == "segmented"
    for r in rows:  # the kernel alone, and what the rest of the pipeline costs
        assert r["impl"] == "reference" and r["kernel_ms"] > 0
        assert r["overhead_ms"] == pytest.approx(r["full_ms"] - r["kernel_ms"])
    for r in rows:
        p = r["parts_ms"]
        assert set(p) == {"sort", "stats", "scores", "topk", "permute"} and all(x >= 0 for x in p.values())
        assert (p["sort"] > 0 and p["permute"] > 0) == r["variant"].startswith("sorted")
    (plain,) = [r for r in rows if r["variant"] == "plain"]
    assert plain["topk_kernel_equal"] is True and plain["topk_kernel_ms"] > 0 and plain["topk_xla_ms"] > 0
    (sorted_row,) = [r for r in rows if "sort_methods" in r]
    sm = sorted_row["sort_methods"]
    assert sorted_row["variant"] == "sorted" and sm["identical"] is True and sm["segmented_ms"] > 0 and sm["flat_ms"] > 0
    md = (tmp_path / "est.md").read_text()
    assert "Parts (ms" in md and "Pallas top-k kernel" in md and "by `argsort_rows` method" in md
    assert md.count("| 256 |") == 2 * len(rows) + 2 and "method `segmented`" in md
    with pytest.raises(SystemExit):
        bench_estimator.main(["--row-argsort", "bitonic"])


def test_dlm_seeds_script_trains_each_seed_and_tabulates(tmp_path):
    """scripts/dlm_seeds.sh on CPU: two seeds of the tiny preset side by side (sharing one GPU's place,
    each with half of its memory), one table of both; too many seeds for the GPUs are refused."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, NUM_GPUS="1", SEEDS_PER_GPU="2", LENGTHS="256",
               CKPT_ROOT=str(tmp_path / "ck"),
               EVAL_ARGS="--only dense --num-examples 1 --nll-seqs 1 --batch 1 --block-size 64")
    script = str(root / "scripts/dlm_seeds.sh")
    r = subprocess.run(["bash", script, "cpu_tiny", str(tmp_path / "out"), "3 5", "--steps", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for seed in (3, 5):
        assert f"seed {seed} on GPU 0 (memory shares: training 0.375, each evaluation 0.140)" in r.stderr
    summary = json.loads((tmp_path / "out" / "dlm_seeds_cpu_tiny.json").read_text())
    assert [row["seed"] for row in summary["seeds"]] == [3, 5]
    assert all(row["steps"] == 2 and set(row["dense"]) == {"256"} for row in summary["seeds"])
    assert "| 3 | 2 |" in (tmp_path / "out" / "dlm_seeds_cpu_tiny.md").read_text()
    assert (tmp_path / "out" / "dlm_seeds_cpu_tiny.png").stat().st_size > 10_000
    for per_gpu, gpus, message in (("1", "2", "3 seeds need 3 GPUs at SEEDS_PER_GPU=1; 2 found"),
                                   ("2", "1", "3 seeds need 2 GPUs at SEEDS_PER_GPU=2; 1 found"),
                                   ("0", "4", "SEEDS_PER_GPU must be a positive integer; got '0'")):
        refused = subprocess.run(["bash", script, "cpu_tiny", str(tmp_path / "o2"), "0 1 2"],
                                 env=dict(env, SEEDS_PER_GPU=per_gpu, NUM_GPUS=gpus),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def _committed_seed_dirs(tmp, preset, seeds_and_runs):
    """One folder per (seed, committed run folder) under ``tmp``, laid out as scripts/dlm_experiment.sh writes
    it (``dlm_train_<preset>.json``, ``dlm_eval_<preset>.json``) from the run's ``seed<S>_{train,eval}.json``."""
    import shutil
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "experiments/results/dlm"
    dirs = []
    for seed, run in seeds_and_runs:
        d = Path(tmp) / f"seed{seed}"
        d.mkdir()
        for kind in ("train", "eval"):
            shutil.copy(results / run / f"seed{seed}_{kind}.json", d / f"dlm_{kind}_{preset}.json")
        dirs.append(d)
    return dirs


def test_dlm_seeds_table_of_committed_run():
    """The seed table reproduces the committed multi-seed run's numbers (run 15: seeds 0, 1 and 6 retrieve)."""
    import json
    import tempfile

    from experiments import dlm_seeds

    with tempfile.TemporaryDirectory() as tmp:
        s = dlm_seeds.summarize(_committed_seed_dirs(tmp, "gpu_passkey_middle",
                                                     [(seed, "dlm_run15_seeds") for seed in range(7)]))
    assert s["retrieving"] == [0, 1, 6] and abs(s["share_retrieving"] - 3 / 7) < 1e-9
    by_seed = {r["seed"]: r for r in s["seeds"]}
    assert by_seed[6]["dense"][4096]["passkey"] == 0.875 and by_seed[6]["first_learnt_step"] == 2000
    assert by_seed[3]["first_learnt_step"] is None
    md = dlm_seeds.markdown(json.loads(json.dumps(s)))
    assert "3 of 7 seeds retrieve" in md


def test_dlm_seeds_table_names_every_commit_of_seeds_from_separate_runs():
    """Seeds trained in separate calls (the committed NIAH seeds 0 and 1) keep apart in the header: both
    commits are named, each once."""
    import tempfile

    from experiments import dlm_seeds

    with tempfile.TemporaryDirectory() as tmp:
        s = dlm_seeds.summarize(_committed_seed_dirs(tmp, "gpu_passkey_conv_niah",
                                                     [(0, "dlm_run19_niah_seed0"), (1, "dlm_run18_niah_seed1")]))
    header = dlm_seeds.markdown(s).splitlines()[0]
    assert header == ("# gpu_passkey_conv_niah: 2 seeds (NVIDIA H100 80GB HBM3, jax 0.11.2, "
                      "commits 4735f01f5e, 5bd73a6067)"), header
    assert s["retrieving"] == [0, 1]


def test_bench_sparse_mosaic_forward_tuning_runs_and_reports(tmp_path):
    """The Mosaic GPU forward-variant benchmark runs end to end off Hopper, reporting each variant's failure
    (a variant that cannot run is a row with its error, never a crash or a missing row)."""
    from experiments import bench_sparse

    cfg = bench_sparse.get_config("smoke", block=128, target_s=0.001, lengths=(256,), sparsities=(0.5,))
    rows = bench_sparse.run_tune_mosaic(cfg)
    variants = [r for r in rows if "sparsity" in r]
    assert [r["variant"] for r in variants] == list(bench_sparse.MOSAIC_FWD_VARIANTS)
    assert all(("error" in r) != ("fwd_ms" in r) for r in variants)
    md = bench_sparse.tune_markdown(dict(device="cpu", jax_version="x", commit="0" * 40, date="today"), rows)
    assert all(f"| {name} |" in md for name in bench_sparse.MOSAIC_FWD_VARIANTS)


# ----------------------------------------------------------------------------- the shared harness


@dataclasses.dataclass(frozen=True)
class _Inner:
    steps: int = 3
    stages: tuple[tuple, ...] = ((1.0, 8),)


@dataclasses.dataclass(frozen=True)
class _Outer:
    lengths: tuple[int, ...] = (256, 512)
    recipe: tuple[bool, bool, float | None] = (True, False, 0.5)
    budget: float | None = None
    head: int | float | None = None
    split: bool = False
    impl: str = dataclasses.field(default="a", metadata=dict(help="which", choices=("a", "b")))
    inner: _Inner = _Inner()


_PRESETS = {"small": _Outer(), "big": _Outer(lengths=(4096,))}


def _get_config(preset: str = "small", **overrides) -> _Outer:
    return dataclasses.replace(_PRESETS[preset], **overrides)


def _parse(argv):
    from experiments import harness

    return harness.parse_config(_get_config, argv, description="test", presets=tuple(_PRESETS),
                                parsers={"stages": lambda t: tuple(float(x) for x in t.split(":"))})


def test_parse_config_has_one_flag_per_field():
    assert _parse([]) == _Outer()
    cfg = _parse(["--preset", "big", "--lengths", "1,2", "3", "--recipe", "false", "true", "none", "--budget", "2.5",
                  "--head", "7", "--split", "--impl", "b", "--steps", "9", "--stages", "0.5:4", "1:8"])
    assert cfg.lengths == (1, 2, 3) and cfg.recipe == (False, True, None) and cfg.budget == 2.5 and cfg.split
    assert cfg.head == 7 and isinstance(cfg.head, int) and _parse(["--head", "0.25"]).head == 0.25
    assert cfg.impl == "b" and cfg.inner == _Inner(steps=9, stages=((0.5, 4.0), (1.0, 8.0)))
    assert _parse(["--preset", "big"]).lengths == (4096,) and _parse(["--budget", "none"]).budget is None


@pytest.mark.parametrize("argv, message", [
    (["--impl", "c"], "--impl: must be one of a, b; got 'c'"),
    (["--recipe", "true"], "--recipe: takes 3 values; got 1"),
    (["--lengths", "x"], "--lengths: invalid literal for int()"),
    (["--steps", "1.5"], "--steps: invalid literal for int()"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_parse_config_names_the_flag_it_refuses(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_parse_config_prints_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--print-config", "--steps", "4"])
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["inner"]["steps"] == 4


@pytest.mark.parametrize("module, study", [
    ("approx_error", "approx_error"), ("bench_sparse", "bench_sparse"), ("bench_backward", "bench_backward"),
    ("bench_estimator", "bench_estimator"), ("bench_oracle", "bench_oracle"), ("train_dlm", "dlm"),
    ("eval_dlm", "dlm"), ("dlm_seeds", "dlm"), ("train_step_time", "train_step_time"), ("profile_backward", None),
])
def test_every_experiment_has_a_config_on_the_command_line(module, study, capsys):
    """Each experiment: a frozen-dataclass config from ``get_config()``, its flags, its study's folder."""
    import importlib

    mod = importlib.import_module(f"experiments.{module}")
    assert mod.__doc__.startswith(f"python -m experiments.{module}")
    cfg = mod.get_config()
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    with pytest.raises(SystemExit) as exc:
        mod.main(["--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and printed == json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    assert printed.get("out") == (None if study is None else f"experiments/results/{study}")


def test_run_metadata_and_results(tmp_path, monkeypatch):
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments import harness

    meta = harness.run_metadata("experiments.x", ["--name", "a b"], extra=1)
    assert meta["device"] == "cpu" and meta["jax_version"] and meta["extra"] == 1
    assert meta["command"] == "python -m experiments.x --name 'a b'"
    assert meta["commit"] == "unknown" or len(meta["commit"]) == 40
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    monkeypatch.setenv("BAATT_COMMIT", "f" * 40)
    assert harness.run_metadata("experiments.x", [])["commit"] == "f" * 40
    fig = plt.figure()
    paths = harness.write_results(tmp_path / "study", {"r.json": dict(meta=meta), "r.md": "# r\n", "r.png": fig})
    assert [p.name for p in paths] == ["r.json", "r.md", "r.png"] and all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["meta"]["commit"] == meta["commit"]
    with pytest.raises(ValueError, match="writes .json, .md and .png"):
        harness.write_results(tmp_path, {"r.txt": ""})


def test_benchmark_inputs_and_random_selections():
    import jax
    import jax.numpy as jnp

    from experiments import harness

    q, k, v = harness.synthetic_inputs(256, heads=4, kv_heads=2, head_dim=16, dtype="bfloat16")
    assert q.shape == (1, 256, 4, 16) and k.shape == v.shape == (1, 256, 2, 16) and q.dtype == jnp.bfloat16
    again = harness.synthetic_inputs(256, heads=4, kv_heads=2, head_dim=16, dtype="bfloat16")
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip((q, k, v), again))  # seeded by the length
    counts = jnp.array([[1, 3, 5]], jnp.int32)
    idx = np.asarray(harness.random_selection(jax.random.PRNGKey(0), counts, 8, width=6))
    for row, n in zip(idx[0], (1, 3, 5)):
        kept = row[:n]
        assert len(set(kept)) == n and list(kept) == sorted(kept) and kept.max() < 8 and all(row[n:] == kept[-1])
