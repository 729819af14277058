"""experiments/tune_row_block_lse.py in its CPU smoke preset (interpret mode): every tiling of both masks timed
and compared with the first; bad tilings named."""

from __future__ import annotations

import json

import pytest

from experiments import tune_row_block_lse


def test_smoke_run(tmp_path):
    result = tune_row_block_lse.main(["--preset", "cpu_smoke", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [(r["mask"], r["row_tile"], r["num_warps"]) for r in rows] == [
        (mask, tile, warps) for mask in ("bidirectional", "causal") for tile, warps in ((64, 4), (16, 4), (128, 8))]
    for r in rows:
        assert "error" not in r and r["kernel_ms"] > 0 and r["cudnn_fwd_ms"] > 0
        assert r["max_abs_diff"] < 1e-5 and r["same_neg_inf"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["device"] == "cpu" and len(saved["rows"]) == 6
    assert "| causal | 128x8 |" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("text", ["128", "x8", "128x", "12ax8"])
def test_tilings_are_rows_x_warps(text):
    with pytest.raises(ValueError, match="ROWSxWARPS"):
        tune_row_block_lse.parse_tiling(text)
    assert tune_row_block_lse.parse_tiling("256x16") == (256, 16)


def test_default_tilings_start_with_the_kernels_own_and_repeat_none():
    from baatt.kernels.pallas_triton import row_block_lse

    tilings = tune_row_block_lse.get_config().tilings
    assert tilings[0] == (row_block_lse.ROW_TILE, row_block_lse.NUM_WARPS)
    assert len(set(tilings)) == len(tilings) and {(64, 4), (128, 4), (256, 16)} <= set(tilings)


def test_an_invalid_tiling_is_reported_not_fatal(tmp_path):
    result = tune_row_block_lse.main(["--preset", "cpu_smoke", "--tilings", "64x4", "48x4", "--causal", "false",
                                      "--out", str(tmp_path)])
    assert "error" not in result["rows"][0]
    assert "row_tile must be a power of two" in result["rows"][1]["error"]
