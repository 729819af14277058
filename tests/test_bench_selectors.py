"""The selector-cost benchmark (``experiments.bench_selectors``) at its CPU smoke size."""

from __future__ import annotations

import json
import math

import pytest

from baatt import selector_registry
from experiments import bench_selectors

# The built-in selectors (baatt.selection), oracles aside; another test module may register more of its own.
BUILT_IN = ("baatt", "meanpool", "xattention", "last_query", "sparge_like", "random", "dense", "query_token", "mixed",
            "quest", "proxy", "pooled_query")


def _broken(q, k, config, *, key_mask=None):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (a selector made to fail)")


def test_cpu_smoke_times_every_selector_and_records_failures(tmp_path, monkeypatch):
    """A row per timed selector with finite positive times; a selector that raises gets its error in its
    row and the sweep goes on; the exact oracles are listed, not timed."""
    monkeypatch.setitem(selector_registry._REGISTERED, "broken",
                        selector_registry.Selector("broken", select=_broken, block_map=_broken))
    res = bench_selectors.main(["--preset", "cpu_smoke", "--out", str(tmp_path)])
    timed = bench_selectors.timed_selectors(bench_selectors.get_config("cpu_smoke"))
    assert "broken" in timed and not set(bench_selectors.ORACLES) & set(timed)
    assert set(res["not_timed"]) == set(bench_selectors.ORACLES)
    rows = res["rows"]
    assert [(r["causal"], r["selector"]) for r in rows] == [(c, n) for c in (False, True) for n in timed]
    assert set(BUILT_IN) <= set(timed)
    for r in rows:
        if r["selector"] == "broken":
            assert r["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED") and "select_ms" not in r
            continue
        if r["selector"] not in BUILT_IN:  # a user's selector may need parameters its defaults lack
            continue
        assert "error" not in r, r
        assert r["impl"] == "reference" and 0 < r["density"] <= 1
        for key in ("select_ms", "full_ms", "cudnn_fwd_ms", "select_frac_cudnn", "full_vs_cudnn"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["selector"], key)
    (dense,) = [r for r in rows if r["selector"] == "dense" and not r["causal"]]
    assert dense["density"] == 1.0 and dense["flops_frac"] == 0.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["config"]["preset"] == "cpu_smoke"
    table = (tmp_path / "table.md").read_text()
    assert table.count("| 512 |") == len(rows) and "RESOURCE_EXHAUSTED" in table
    assert "Not timed" in table and "`oracle`" in table and "`max_oracle`" in table


def test_help_and_config_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_selectors.main(["--help"])
    assert exc.value.code == 0 and "--selectors" in capsys.readouterr().out
    assert bench_selectors.__doc__.startswith("python -m experiments.bench_selectors")
    cfg = bench_selectors.get_config()
    assert cfg.out == "experiments/results/bench_selectors" and cfg.causal == (False, True)
    with pytest.raises(SystemExit) as exc:
        bench_selectors.main(["--preset", "cpu_smoke", "--causal", "true", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and printed["causal"] == [True] and printed["dense_impl"] == "xla"


def test_deadline_skips_and_lists_the_rest(tmp_path):
    res = bench_selectors.main(["--preset", "cpu_smoke", "--deadline-s", "0", "--causal", "true",
                                "--selectors", "meanpool", "random", "--out", str(tmp_path)])
    assert res["rows"] == []
    assert res["skipped_at_deadline"] == ["meanpool (L=512, causal, sparsity 0.9)", "random (L=512, causal, sparsity 0.9)"]
    assert "Skipped at the deadline (0.0 s)" in (tmp_path / "table.md").read_text()


def test_deadline_met_mid_group_skips_compiled_selectors():
    """A deadline reached after the programs were lowered: none is timed, each is listed as skipped."""
    from concurrent.futures import ThreadPoolExecutor

    import jax.numpy as jnp

    cfg = bench_selectors.get_config("cpu_smoke", selectors=("meanpool", "random", "broken"))
    q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
    calls = iter(range(100))
    with ThreadPoolExecutor(2) as pool:  # "broken" is not registered: its lowering fails, and that is kept
        rows, skipped = bench_selectors.measure_group(q, q, q, sparsity=0.5, causal=False, t_dense=1.0, cfg=cfg,
                                                      pool=pool, tm=None, past_deadline=lambda: next(calls) >= 3)
    assert skipped == ["meanpool", "random"]
    assert [r["selector"] for r in rows] == ["broken"] and "selector must be one of" in rows[0]["error"]


def test_every_built_in_selector_has_a_flop_formula(monkeypatch):
    """The cost column covers every built-in selector, with the formulas of their docstrings; a user's
    selector has none (its row shows no cost rather than a made-up one)."""
    from baatt import BAConfig
    from experiments.selector_flops import flop_fraction

    for name in BUILT_IN + tuple(bench_selectors.ORACLES):
        share = flop_fraction(BAConfig(selector=name, block_size=128), length=8192, q_heads=32, kv_heads=8)
        assert 0.0 <= share <= 1.0, name
    pooled = flop_fraction(BAConfig(selector="pooled_query", block_size=128), length=8192, q_heads=32, kv_heads=8)
    assert pooled == pytest.approx(1 / 256)  # one mean query per 128-query block against every key
    proxy = flop_fraction(BAConfig(selector="proxy", block_size=128), length=8192, q_heads=32, kv_heads=8)
    assert proxy == pytest.approx(1 / (2 * 16 * 4))  # stride 16, one kv head per proxy, 4 query heads per kv head
    monkeypatch.setitem(selector_registry._REGISTERED, "users_own",
                        selector_registry.Selector("users_own", select=_broken, block_map=_broken))
    with pytest.raises(ValueError, match="no FLOP formula"):
        flop_fraction(BAConfig(selector="users_own", block_size=128), length=8192, q_heads=1, kv_heads=1)
    assert bench_selectors.estimator_flops(BAConfig(selector="users_own", block_size=128),
                                           bench_selectors.get_config("cpu_smoke"), 512) is None


def test_runs_without_the_gguf_reader():
    """The benchmark times synthetic Q/K/V: importing it must not need the GGUF reader of the real-model studies."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys; sys.modules['gguf'] = None; import experiments.bench_selectors"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
