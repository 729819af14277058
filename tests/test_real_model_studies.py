"""The studies on SmolLM2-135M's real attention run end to end at small sizes: experiments.selectors_real_qk
(with its sort x compensation ablation and bound correlation) and experiments.sparse_prefill (perplexity and
needle prompts through the model with every layer block-sparse under its causal mask)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx

import baatt
from baatt.data import data_dir
from baatt.nn import load_smollm2, smollm2_path
from experiments import selectors_real_qk, sparse_prefill

pytestmark = pytest.mark.skipif(
    not smollm2_path().is_file(),
    reason=f"SmolLM2 GGUF not installed at {smollm2_path()} (run `bash scripts/setup_data.sh`)",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(progress=False)


def test_selectors_real_qk_with_ablation_and_bound(tmp_path):
    cfg = selectors_real_qk.get_config(length=256, layers=(0,), block_sizes=(64,), sparsities=(0.5, 0.95),
                                       rows=("meanpool", "oracle"), ablation=True, bound=True, out=str(tmp_path))
    results = selectors_real_qk.run(cfg)
    rows = {(r["mask"], r["row"]) for r in results["results"]}
    assert ("causal", "meanpool") in rows and ("bidirectional", "sort_qk_comp05") in rows
    # Sorting is refused under a causal mask; compensation alone runs under both masks.
    causal_ablation = {name for mask, name in rows if mask == "causal" and name in selectors_real_qk.ABLATION_ROWS}
    assert causal_ablation == {"unsorted", "unsorted_comp05", "unsorted_comp10"}
    assert {r["sparsity"] for r in results["results"]} == {0.5, 0.95}
    assert len(results["bound"]) == 2  # one per mask
    for b in results["bound"]:
        assert -1 <= b["pearson"] <= 1 and b["ratio_max"] <= 1 + 1e-3  # the bound holds
    table = selectors_real_qk.write_table(results, cfg)
    assert "off-distribution" in table and "Deviation bound U" in table


def test_needle_prompt_places_the_answer_after_the_question(smollm2):
    _, _, tokenizer = smollm2
    haystack = tokenizer.encode((data_dir() / "raw" / "sotu/2010_barack_obama_d.txt").read_text())
    rng = np.random.default_rng(0)
    for needles in (1, 3):
        p = sparse_prefill.needle_prompt(tokenizer, haystack, length=300, row_length=512, needles=needles, rng=rng)
        assert p.tokens.shape == (512,) and p.answer.stop == 300
        answer = tokenizer.decode(list(p.tokens[p.answer])).strip()
        assert len(answer) == 5 and answer.isdigit()
        prompt = tokenizer.decode(list(p.tokens[: p.answer.start]))
        assert prompt.count(f"is {answer}.") >= 1 and prompt.endswith(" is ")


def _first_layers(n: int):
    """load_smollm2 keeping the first ``n`` layers: the pipeline, not the model's quality, is under test, and
    few layers compile fast."""
    def load(**overrides):
        cfg_model, model, tokenizer = load_smollm2(**overrides)
        model.blocks = nnx.List(list(model.blocks)[:n])
        return cfg_model, model, tokenizer

    return load


def test_sparse_prefill_runs_every_layer_sparse(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_prefill, "load_smollm2", _first_layers(2))
    results = sparse_prefill.main(["--preset", "smoke", "--length", "256", "--prefixes", "128", "256",
                                   "--selectors", "meanpool", "--sinks", "false", "true", "--passkey-lengths",
                                   "256", "--trials", "1", "--out", str(tmp_path)])
    assert [r["label"] for r in results["results"]] == ["meanpool", "meanpool + sink"]
    for r in [results["dense"], *results["results"]]:
        assert set(r["perplexity"]) == {"128", "256"} and all(np.isfinite(v) for v in r["perplexity"].values())
    assert set(results["dense"]["accuracy"]) == {"1x256"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["config"]["length"] == 256
    assert (tmp_path / "perplexity.png").stat().st_size > 0 and "| dense | 0% |" in (tmp_path / "table.md").read_text()


def test_sparse_prefill_local_window_and_tail_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_prefill, "load_smollm2", _first_layers(1))
    results = sparse_prefill.main(["--preset", "smoke", "--length", "256", "--prefixes", "256", "--selectors",
                                   "meanpool", "--sinks", "true", "--local-windows", "0", "1", "--tails", "none",
                                   "pooled", "--sparsities", "0.7", "--passkey-lengths", "256", "--trials", "1",
                                   "--out", str(tmp_path)])
    rows = {r["label"]: r["perplexity"]["256"] for r in results["results"]}
    assert list(rows) == ["meanpool + sink", "meanpool + sink + tail", "meanpool + sink + local 1",
                          "meanpool + sink + local 1 + tail"]
    # each switch changes what the model computes: four distinct perplexities, none of them dense's
    assert len({round(v, 6) for v in rows.values()} | {round(results["dense"]["perplexity"]["256"], 6)}) == 5


def test_sparse_prefill_head_budget_twins_spend_the_rows_density(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_prefill, "load_smollm2", _first_layers(2))
    captured = []  # the tokens whose Q/K calibrate the budgets
    capture = sparse_prefill.capture_qkv
    monkeypatch.setattr(sparse_prefill, "capture_qkv",
                        lambda model, tokens, **kw: captured.append(np.asarray(tokens)) or capture(model, tokens, **kw))
    held_out = "sotu/2000_william_j_clinton_d.txt"  # not one of the evaluated documents
    results = sparse_prefill.main(["--preset", "smoke", "--length", "512", "--prefixes", "512", "--selectors",
                                   "meanpool", "--sinks", "true", "--local-windows", "1", "--sparsities", "0.7",
                                   "--head-budgets", "--block-size", "32", "--passkey-lengths", "512",
                                   "--trials", "1", "--calibration-document", held_out, "--out", str(tmp_path)])
    _, _, tokenizer = load_smollm2()
    expected = tokenizer.encode((data_dir() / "raw" / held_out).read_text())[:512]
    assert len(captured) == 1 and captured[0].tolist() == [expected]
    uniform, twin = results["results"]
    assert twin["label"] == "meanpool + sink + local 1, per head" and twin["head_budgets"]["calibrated_on"] == held_out
    counts = np.asarray(twin["head_budgets"]["counts"])
    assert counts.shape == (2, 9) and len(np.unique(counts)) > 1  # two layers, nine heads, not one count
    # the twin spends at most the uniform row's kept share, and nearly all of it
    assert uniform["effective_sparsity"]["512"] <= twin["effective_sparsity"]["512"] <= uniform["effective_sparsity"]["512"] + 0.05
    assert twin["perplexity"]["512"] != uniform["perplexity"]["512"] and np.isfinite(twin["perplexity"]["512"])
    table = (tmp_path / "table.md").read_text()
    assert "per head" in table and f"calibrated on the first 512 tokens of {held_out}" in table
    relative = 100 * (twin["perplexity"]["512"] / results["dense"]["perplexity"]["512"] - 1)
    assert f"| {relative:+.2f}% |" in table


def test_sparse_prefill_names_a_bad_calibration_document(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_prefill, "load_smollm2", _first_layers(1))
    with pytest.raises(ValueError, match="calibration_document must be a file"):
        sparse_prefill.main(["--preset", "smoke", "--head-budgets", "--calibration-document", "sotu/none.txt",
                             "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="calibration_document must have at least length=4096 tokens"):
        sparse_prefill.main(["--preset", "smoke", "--length", "4096", "--prefixes", "4096", "--passkey-lengths",
                             "512", "--head-budgets", "--calibration-document", "sotu/1790_george_washington_n.txt",
                             "--out", str(tmp_path)])


@pytest.mark.parametrize("window", [0, 1, 3])
def test_effective_sparsity_counts_forced_blocks(window):
    # brute force: per query block a (causal, equal blocks: a + 1 allowed), the nominal budget or the forced
    # blocks (sink block 0, the window, the diagonal), whichever is more, never more than allowed
    length, block, s = 1024, 64, 0.7
    config = baatt.BAConfig(block_size=block, sparsity=s, force_sink=True, local_window=window,
                            mask=baatt.AttentionMask.causal())
    kept = [min(max(math.ceil(round((1 - s) * (a + 1), 9)), len({0, *range(max(0, a - window), a + 1)})), a + 1)
            for a in range(length // block)]
    expected = 1 - sum(kept) / sum(a + 1 for a in range(length // block))
    assert sparse_prefill.effective_sparsity(config, length) == pytest.approx(expected, abs=1e-9)
