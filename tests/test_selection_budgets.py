"""Per-head budgets and their calibration, clustered block spaces, the accuracy guard."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import baatt
from baatt import reference
from baatt.reference.error import selected_mass
from baatt.selection.calibrate import Budgets, calibrate_budgets, kept_share, recall_curves, select_with_budget
from baatt.selection.cluster import balanced_kmeans
from baatt.selection.guard import guard_selection

BLOCK = 16


def _qkv(length=128, heads=4, kv_heads=2, d=16, seed=0, spread=2.0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = spread * jax.random.normal(ks[0], (1, length, heads, d))
    k = spread * jax.random.normal(ks[1], (1, length, kv_heads, d))
    v = jax.random.normal(ks[2], (1, length, kv_heads, d))
    return q, k, v


def _brute_force_recall(q, k, config, count):
    """Oracle mass kept with ``count`` blocks in every head, each head's kept set enumerated: the
    selector's top-``count`` blocks by its block map, judged against M_hat."""
    mass = baatt.selection.block_map(q, k, config)
    m_hat = reference.post_downsample_map(q, k, block_size=config.block_q)
    mass, m_hat = np.asarray(mass), np.asarray(m_hat)
    b, h, nq, nk = mass.shape
    kept = np.zeros((b, h, nq))
    for bi, hi, a in itertools.product(range(b), range(h), range(nq)):
        order = sorted(range(nk), key=lambda j: (-mass[bi, hi, a, j], j))
        kept[bi, hi, a] = sum(m_hat[bi, hi, a, j] for j in order[:count])
    return kept.mean(axis=(0, 2))


def test_select_with_budget_keeps_each_heads_count():
    q, k, _ = _qkv()
    config = baatt.BAConfig(block_size=BLOCK, selector="meanpool")
    counts = jnp.asarray([1, 3, 8, 5])
    sel = select_with_budget(q, k, config, counts, kmax=8)
    assert sel.kmax == 8
    np.testing.assert_array_equal(np.asarray(sel.counts)[0, :, 0], [1, 3, 8, 5])
    sel.validate(batch=1, q_heads=4, kv_heads=2, length_q=128, length_k=128)
    # One program for every set of counts: a traced array changes no static argument.
    jitted = jax.jit(lambda c: select_with_budget(q, k, config, c, kmax=8).counts)
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray([2, 2, 2, 2])))[0, :, 0], [2, 2, 2, 2])


def test_recall_curves_match_brute_force():
    q, k, _ = _qkv(length=96)
    config = baatt.BAConfig(block_size=BLOCK, selector="meanpool")
    curves = np.asarray(recall_curves(q, k, config))
    for count in (1, 3, 6):
        np.testing.assert_allclose(curves[:, count - 1], _brute_force_recall(q, k, config, count), atol=1e-5)


def test_calibrated_counts_are_the_smallest_reaching_the_target():
    q, k, _ = _qkv()
    config = baatt.BAConfig(block_size=BLOCK, selector="meanpool")
    budgets = calibrate_budgets({2: (q, k)}, config, target_recall=0.8)
    counts = budgets.head_counts(2)
    for head, count in enumerate(counts):
        assert _brute_force_recall(q, k, config, int(count))[head] >= 0.8 - 1e-5
        if count > 1:
            assert _brute_force_recall(q, k, config, int(count) - 1)[head] < 0.8
    sel = select_with_budget(q, k, config, jnp.asarray(counts), kmax=int(counts.max()))
    m_hat = reference.post_downsample_map(q, k, block_size=BLOCK)
    np.testing.assert_allclose(np.asarray(selected_mass(m_hat, sel)).mean(axis=(0, 2)), budgets.recall[0], atol=1e-5)
    assert budgets.head_counts(0) is None


def test_calibration_to_a_density_and_json_round_trip(tmp_path):
    q, k, _ = _qkv()
    config = baatt.BAConfig(block_size=BLOCK, selector="oracle")
    budgets = calibrate_budgets([(q, k), (q, k)], config, target_density=0.25)
    assert budgets.density <= 0.25 + 1e-9
    path = tmp_path / "budgets.json"
    budgets.save(path)
    loaded = Budgets.load(path)
    assert loaded == budgets and hash(loaded) == hash(budgets)
    np.testing.assert_array_equal(loaded.head_counts(1, 2 * budgets.num_k_blocks), 2 * np.asarray(budgets.counts[1]))
    with pytest.raises(ValueError, match="exactly one of target_recall"):
        calibrate_budgets([(q, k)], config)


def test_attention_with_head_budget_and_plan():
    q, k, v = _qkv()
    config = baatt.BAConfig(block_size=BLOCK, selector="meanpool")
    out, stats = baatt.attention(q, k, v, config=config, head_budget=np.array([8, 8, 8, 8]), return_stats=True,
                                 implementation="reference")
    np.testing.assert_allclose(np.asarray(stats.density), 1.0)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-5)
    _, stats = baatt.attention(q, k, v, config=config, head_budget=np.array([0.25, 0.5, 1.0, 0.125]),
                               return_stats=True, implementation="reference")
    np.testing.assert_allclose(np.asarray(stats.density)[0], [0.25, 0.5, 1.0, 0.125])
    with pytest.raises(ValueError, match="head_budget must have shape"):
        baatt.attention(q, k, v, config=config, head_budget=np.array([1, 2]))
    budgets = calibrate_budgets({0: (q, k)}, config, target_recall=0.9)
    plan = baatt.nn.AttentionPlan.ba(config, budgets=budgets, implementation="reference")
    _, info = baatt.nn.attention.run_layer_attention(plan, 0, 2, q, k, v)
    np.testing.assert_array_equal(np.asarray(info["selection"].counts)[0, :, 0], budgets.head_counts(0))


def test_balanced_kmeans_is_a_balanced_bijection_that_groups_directions():
    # Four directions, shuffled: clusters of one block each should recover them.
    directions = jax.random.normal(jax.random.key(3), (4, 16))
    labels = jax.random.permutation(jax.random.key(4), jnp.repeat(jnp.arange(4), 32))
    x = (directions[labels] + 0.1 * jax.random.normal(jax.random.key(5), (128, 16)))[None, :, None, :]
    perm = np.asarray(balanced_kmeans(x, 32, iters=4))
    np.testing.assert_array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(128), perm.shape))
    clusters = np.asarray(labels)[perm[0, 0]].reshape(4, 32)
    assert all(len(set(row)) == 1 for row in clusters)
    # Ragged length and masked tokens: still a permutation, masked ones last.
    q, _, _ = _qkv(length=100)
    mask = jnp.arange(100)[None] < 70
    perm = np.asarray(balanced_kmeans(q, BLOCK, iters=2, mask=mask))
    np.testing.assert_array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(100), perm.shape))
    assert np.all(perm[..., 70:] >= 70)


def test_clustered_space_with_every_block_kept_equals_dense():
    q, k, v = _qkv(length=112)
    config = baatt.BAConfig(block_size=BLOCK, cluster_q=True, cluster_k=True)
    out, stats = baatt.attention(q, k, v, config=config, return_stats=True, implementation="reference")
    assert stats.selection.q_perm is not None and stats.selection.k_perm is not None
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=2e-5)
    sparse = config.replace(sparsity=0.5, selector="oracle")
    sel = baatt.select_blocks(q, k, sparse)
    sel.validate(batch=1, q_heads=4, kv_heads=2, length_q=112, length_k=112)


def test_clustering_is_refused_where_positions_matter():
    with pytest.raises(ValueError, match="cluster_k must be False under a causal mask"):
        baatt.BAConfig(cluster_k=True, mask="causal")
    with pytest.raises(ValueError, match="cluster_q and sort_q"):
        baatt.BAConfig(cluster_q=True, sort_q=True)
    with pytest.raises(ValueError, match="guard_recall"):
        baatt.BAConfig(guard_recall=1.5)


def _needle(length=256, d=16, heads=2):
    """Keys in blocks of one direction each; query block ``a`` looks at key block ``a`` (easy for mean
    pooling). With ``needle``: one key of block 0, aligned with every query, whose block mean cancels."""
    ks = jax.random.split(jax.random.key(7), 4)
    n = length // BLOCK
    dirs = jax.random.normal(ks[0], (n, d))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
    q = 6.0 * jnp.repeat(dirs, BLOCK, axis=0) + 0.1 * jax.random.normal(ks[1], (length, d))
    k = 6.0 * jnp.repeat(dirs, BLOCK, axis=0) + 0.1 * jax.random.normal(ks[2], (length, d))
    q, k = (jnp.broadcast_to(x[None, :, None], (1, length, heads, d)) for x in (q, k))
    v = jax.random.normal(ks[3], (1, length, heads, d))
    return q, k, v


def test_guard_stays_quiet_on_an_easy_input_and_fires_on_a_needle():
    q, k, v = _needle()
    config = baatt.BAConfig(block_size=BLOCK, sparsity=0.9, selector="meanpool", guard_recall=0.9)
    _, stats = baatt.attention(q, k, v, config=config, return_stats=True, implementation="reference")
    assert not bool(jnp.any(stats.guard.fired))
    assert stats.guard.cost == BLOCK / (2 * q.shape[1])
    # The needle: every query puts most of its mass on one key of block 5; its block mean is 0.
    u = jnp.sum(q[0, :, 0], axis=0)
    u = u / jnp.linalg.norm(u)
    needle = k.at[:, 5 * BLOCK].set(60.0 * u).at[:, 5 * BLOCK + 1 : 6 * BLOCK].set(-60.0 * u / (BLOCK - 1))
    out, stats = baatt.attention(q, needle, v, config=config, return_stats=True, implementation="reference")
    assert bool(jnp.all(stats.guard.fired)) and float(stats.guard.fire_rate) == 1.0
    np.testing.assert_allclose(np.asarray(stats.density), 1.0)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, needle, v), atol=2e-5)


def test_guard_densifies_only_the_failing_heads():
    q, k, _ = _needle()
    config = baatt.BAConfig(block_size=BLOCK, sparsity=0.9, selector="meanpool", guard_recall=0.9)
    sel = baatt.select_blocks(q, k, config)
    forced_low = config.replace(guard_recall=1.0)  # an exact recall of 1 is out of reach at 90% sparsity
    guarded, report = guard_selection(q, k, sel, forced_low)
    assert bool(jnp.all(report.fired))
    guarded.validate(batch=1, q_heads=2, kv_heads=2, length_q=256, length_k=256)
    kept, _ = guard_selection(q, k, sel, config)
    np.testing.assert_array_equal(np.asarray(kept.counts), np.asarray(sel.counts))


def test_experiment_has_a_config_on_the_command_line(capsys):
    import dataclasses
    import json

    from experiments import selection_budgets

    assert selection_budgets.__doc__.startswith("python -m experiments.selection_budgets")
    with pytest.raises(SystemExit) as exc:
        selection_budgets.main(["--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0
    assert printed == json.loads(json.dumps(dataclasses.asdict(selection_budgets.get_config()), default=str))
    assert printed["out"] == "experiments/results/selection_budgets"


def test_density_target_counts_forced_blocks_and_the_causal_mask():
    # Under a causal mask with a sink and a local window, short rows keep every allowed block whatever the
    # count: the density a calibration spends is the kept share of the allowed pairs, not the mean count / Nk.
    q, k, v = _qkv()
    config = baatt.BAConfig(block_size=BLOCK, selector="meanpool", force_sink=True, local_window=1,
                            mask=baatt.AttentionMask.causal())
    budgets = calibrate_budgets({0: (q, k)}, config, target_density=0.6)
    counts = budgets.head_counts(0)
    nq = q.shape[1] // BLOCK
    brute = [sum(min(max(int(c), len({0, *range(max(0, a - 1), a + 1)})), a + 1) for a in range(nq))
             / sum(a + 1 for a in range(nq)) for c in counts]
    assert kept_share(counts, config, length_q=q.shape[1], length_k=k.shape[1]) == pytest.approx(np.mean(brute))
    assert np.mean(brute) <= 0.6 + 1e-9 and budgets.density < np.mean(brute)  # mean count / Nk understates it
    sel = select_with_budget(q, k, config, jnp.asarray(counts), kmax=nq)
    kept = np.asarray(sel.counts)[0].sum(-1) / sum(a + 1 for a in range(nq))  # per head, from the selection
    np.testing.assert_allclose(kept, brute, atol=1e-9)


def _brute_force_judge(q, k, v, sel):
    """Per-query kept softmax mass and the output over the kept keys, from the selection's block lists
    and permutations alone (NumPy, float64): (mean kept mass, its 5th percentile, output [B, L, Hq, D])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, hq, d = q.shape
    group = hq // k.shape[2]
    identity = np.broadcast_to(np.arange(length), (b, hq, length))
    q_perm = identity if sel.q_perm is None else np.asarray(sel.q_perm)
    k_perm = identity[:, ::group] if sel.k_perm is None else np.asarray(sel.k_perm)
    indices, counts = np.asarray(sel.indices), np.asarray(sel.counts)
    masses, out = [], np.zeros_like(q)
    for bi, h in itertools.product(range(b), range(hq)):
        logits = q[bi, :, h] @ k[bi, :, h // group].T / np.sqrt(d)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for slot, i in enumerate(q_perm[bi, h]):
            a = slot // sel.block_q
            blocks = indices[bi, h, a, : counts[bi, h, a]]
            keys = np.concatenate([k_perm[bi, h // group, j * sel.block_k: (j + 1) * sel.block_k] for j in blocks])
            masses.append(probs[i, keys].sum())
            w = probs[i, keys] / probs[i, keys].sum()
            out[bi, i, h] = w @ v[bi, keys, h // group]
    return float(np.mean(masses)), float(np.quantile(masses, 0.05)), out


def test_block_space_part_judges_every_space_like_a_brute_force():
    """selection_budgets part (b): each row's oracle mass, query-mass p5, density and output error equal a
    NumPy brute force over the same selection (positional and clustered), and in each space the oracle keeps
    at least the mass of every estimator at the same budget."""
    from experiments import selection_budgets

    q, k, v = _qkv(length=128, heads=4, kv_heads=2, d=16, seed=3)
    arrays = {0: dict(q=np.asarray(q), k=np.asarray(k), v=np.asarray(v))}
    cfg = selection_budgets.get_config(block_size=BLOCK, sparsity=0.75, cluster_iters=2)
    result = selection_budgets.part_b(cfg, arrays, [0], 0)
    assert set(result["summary"]) == set(selection_budgets.SPACE_ROWS)
    dense = np.asarray(jax.nn.dot_product_attention(q, k, v), np.float64)
    sels = {}
    for label, changes in selection_budgets.SPACE_ROWS.items():
        sel = sels[label] = baatt.select_blocks(q, k, baatt.BAConfig(block_size=BLOCK, sparsity=0.75, cluster_iters=2,
                                                                     **changes))
        mass, p05, out = _brute_force_judge(q, k, v, sel)
        got = result["summary"][label]
        assert got["mass"] == pytest.approx(mass, abs=1e-4), label
        assert got["p05"] == pytest.approx(p05, abs=1e-4), label
        assert got["density"] == pytest.approx(float(np.mean(np.asarray(sel.counts))) / (128 // BLOCK)), label
        err = np.linalg.norm(out - dense) / np.linalg.norm(dense)
        assert got["output_error"] == pytest.approx(err, rel=1e-3, abs=1e-5), label
        assert 0.0 < got["output_error"], label  # 75% of the blocks dropped: never the dense result
    summary = result["summary"]
    for space in ("positional", "clustered"):
        for estimator in ("meanpool", "pooled_query"):
            assert summary[f"oracle, {space}"]["mass"] >= summary[f"{estimator}, {space}"]["mass"] - 1e-6
    assert result["cluster_flops"] == pytest.approx(2 / (2 * BLOCK) * (1 + 2 / 4))
    # The value spread: between-block share of V's variance, against a direct NumPy sum over blocks.
    (spread,) = result["value_spread"]
    clustered = np.asarray(sels["oracle, clustered"].k_perm[0])
    for name, order in (("positional", np.tile(np.arange(128), (2, 1))), ("clustered", clustered)):
        for h in range(2):
            vh = np.asarray(v, np.float64)[0, order[h], h]
            blocks = vh.reshape(128 // BLOCK, BLOCK, -1)
            want = BLOCK * np.sum((blocks.mean(1) - vh.mean(0)) ** 2) / np.sum((vh - vh.mean(0)) ** 2)
            assert spread[name][h] == pytest.approx(want, rel=1e-9), (name, h)
    assert selection_budgets.value_spread(np.repeat(np.eye(2)[:, None], 64, axis=0).reshape(128, 1, 2),
                                          np.arange(128)[None], 64)[0] == pytest.approx(1.0)  # two constant halves
