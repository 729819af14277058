"""experiments/last_query_cost.py in its CPU smoke preset: the code path and the argument check."""

from __future__ import annotations

import json

import pytest

from experiments import last_query_cost


def test_last_query_cost_dry_run(tmp_path):
    result = last_query_cost.main(["--preset", "cpu_smoke", "--length", "512", "--out", str(tmp_path)])
    assert [r["queries"] for r in result["rows"]] == ["last 64 (default)", "32 given"]
    for row in result["rows"]:
        assert row["select_ms"] > 0 and row["full_ms"] > 0
        assert row["select_share"] == pytest.approx(row["select_ms"] / result["dense_fwd_ms"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["config"]["dense_impl"] == "xla"
    assert "| 32 given |" in (tmp_path / "table.md").read_text()


def test_last_query_cost_names_a_bad_length(tmp_path):
    with pytest.raises(ValueError, match="length must be a multiple of the block"):
        last_query_cost.main(["--preset", "cpu_smoke", "--length", "1000", "--out", str(tmp_path)])
