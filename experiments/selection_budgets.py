"""python -m experiments.selection_budgets

Selection beyond one budget and one block space, on the post-rotary Q/K/V of SmolLM2-135M-Instruct
(``baatt.nn.capture_qkv`` over the 2010 State of the Union address, attended bidirectionally):

(a) per-head budgets: ``baatt.selection.calibrate.calibrate_budgets`` finds, per (layer, head), the
    fewest key blocks per query block whose oracle recall (the share of the oracle map ``M_hat`` the
    selector's top blocks keep) reaches ``--target-recall`` on a calibration window; timed. Judged on
    an evaluation window (another stretch of the document, or the same one with
    ``--eval-start none``): density, oracle mass kept, the 5th percentile of the softmax mass a query
    keeps, and the output error, against one budget for every head at the same mean density.
(b) clustered block spaces (``BAConfig(cluster_q=True, cluster_k=True)``, balanced k-means on the
    token directions) against positional blocks at ``--sparsity``: the oracle's and the estimators'
    oracle mass, 5th-percentile query mass and output error (meanpool and pooled_query in both spaces;
    mixed, which is positional only), and what clustering costs (measured time of the permutations,
    and FLOPs over dense attention).
(c) the accuracy guard (``BAConfig(guard_recall=...)``) at ``--sparsity``, at each of
    ``--guard-recalls``: how often it densifies a head, the density it leaves, and the output error
    with and without it.

Masses are judged in each selection's own block space (a clustered selection against the clustered
``M_hat``); each is a share of the same exact attention, so they compare across spaces.

``--parts a`` runs the calibration alone; ``--ckpt-dir`` studies the SmolLM2-adapted diffusion LM
(``experiments.adapt_smollm2``'s checkpoint) instead of SmolLM2.

CPU defaults: 1,024 tokens, layers 0, 7, 15 and 29, calibrated on the first 1,024 tokens and
evaluated on the next 1,024 (about 3 minutes on two cores; ``--length 2048``, about 10). The full study is
``--length 8192 --layers none --eval-start none`` on a GPU (the document has fewer than 16K tokens,
so it evaluates in-sample). Needs the SmolLM2 GGUF (``bash scripts/setup_data.sh``). Writes
``results.json``, ``budgets.json`` (the calibrated budgets, ``Budgets.load``-able) and ``table.md`` to
``--out`` (default ``experiments/results/selection_budgets/``).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import baatt
from baatt import reference
from baatt.data import data_dir
from baatt.nn import capture_qkv, load_smollm2
from baatt.reference import error
from baatt.selection.calibrate import calibrate_budgets, select_with_budget
from baatt.selection.cluster import balanced_kmeans
from experiments import harness

SPACE_ROWS = {  # label -> config changes, for part (b)
    "oracle, positional": dict(selector="oracle"),
    "oracle, norm-sorted": dict(selector="oracle", sort_q=True, sort_k=True),
    "oracle, clustered": dict(selector="oracle", cluster_q=True, cluster_k=True),
    "meanpool, positional": dict(selector="meanpool"),
    "meanpool, clustered": dict(selector="meanpool", cluster_q=True, cluster_k=True),
    "pooled_query, positional": dict(selector="pooled_query"),
    "pooled_query, clustered": dict(selector="pooled_query", cluster_q=True, cluster_k=True),
    "mixed, positional": dict(selector="mixed"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    length: int = harness.option(1024, "tokens per window fed to the model (at most 8192, its context)")
    eval_start: int | None = harness.option(1024, "first token of the evaluation window; none: evaluate on the "
                                            "calibration window (tokens 0 .. length)")
    layers: tuple[int, ...] | None = harness.option((0, 7, 15, 29), "layers studied; none: all")
    block_size: int = harness.option(64, "query and key block size")
    target_recall: float = harness.option(0.95, "oracle recall the calibrated budgets reach, per head")
    calibration_selector: str = harness.option("mixed", "selector whose ranking is calibrated")
    sparsity: float = harness.option(0.9, "fixed budget of parts (b) and (c)")
    cluster_iters: int = harness.option(4, "Lloyd iterations of the clustering")
    guard_recalls: tuple[float, ...] = harness.option((0.3, 0.5, 0.9), "recalls below which the guard densifies a "
                                                      "head (one run each)")
    guard_selectors: tuple[str, ...] = harness.option(("meanpool", "mixed"), "selectors the guard checks")
    implementation: str | None = harness.option(None, "baatt.attention implementation; none: the best available")
    text: str = harness.option("sotu/2010_barack_obama_d.txt", "the document, under <data dir>/raw/")
    parts: tuple[str, ...] = harness.option(("a", "b", "c"), "parts of the study to run", choices=("a", "b", "c"))
    ckpt_dir: str | None = harness.option(
        None, "experiments.adapt_smollm2's checkpoint: the Q/K/V of the SmolLM2-adapted diffusion LM (its trained "
              "weights restored) instead of SmolLM2's")
    out: str = harness.option(harness.study_dir("selection_budgets"), "output folder")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def capture(cfg: Config, workdir: str):
    """Q/K/V [B, L, H, D] of the chosen layers: batch row 0 the calibration window, row 1 (with
    ``eval_start``) the evaluation one."""
    if cfg.ckpt_dir is None:
        _, model, tokenizer = load_smollm2(progress=False)
        name = "SmolLM2-135M-Instruct (GGUF Q4_1)"
    else:
        from experiments.adapt_smollm2 import load_adapted, smollm2_gguf

        model, tokenizer, name, _ = load_adapted(smollm2_gguf(), cfg.ckpt_dir, "float32")
    ids = tokenizer.encode((data_dir() / "raw" / cfg.text).read_text())
    start = 0 if cfg.eval_start is None else cfg.eval_start
    if max(cfg.length, start + cfg.length) > len(ids):
        raise ValueError(f"length and eval_start must fit the document's {len(ids)} tokens; got {cfg.length}, "
                         f"{cfg.eval_start}")
    windows = [ids[: cfg.length]] if cfg.eval_start is None else [ids[: cfg.length], ids[start: start + cfg.length]]
    windows = jnp.asarray(windows, jnp.int32)
    layers = range(model.cfg.num_layers) if cfg.layers is None else cfg.layers
    arrays = capture_qkv(model, windows, layers=layers, out_dir=workdir)
    info = dict(model=name, document=cfg.text, tokens=cfg.length,
                eval_start=cfg.eval_start, heads=model.cfg.num_heads, kv_heads=model.cfg.num_kv_heads,
                head_dim=model.cfg.head_dim)
    return arrays, sorted(arrays), info


def judge(q, k, v, sel, dense, out=None, implementation=None) -> dict:
    """Oracle mass kept (in the selection's space), query-mass tails, density and output error of ``sel``."""
    m_hat = reference.post_downsample_map(q, k, block_size=sel.block_q, q_perm=sel.q_perm, k_perm=sel.k_perm)
    if out is None:
        out = baatt.attention(q, k, v, selection=sel, implementation=implementation)
    tails = error.query_mass_tails(error.query_mass(q, k, sel))
    nk = m_hat.shape[-1]
    return dict(mass=float(jnp.mean(error.selected_mass(m_hat, sel))), p05=float(tails["low_quantile"]),
                density=float(jnp.mean(sel.density(nk))), output_error=float(error.relative_output_error(out, dense)))


_select_with_budget = jax.jit(select_with_budget, static_argnums=(2,), static_argnames=("kmax",))


def part_a(cfg: Config, arrays, layers, row) -> dict:
    """Calibrate on row 0, judge row ``row`` against a uniform budget of the same mean count."""
    config = baatt.BAConfig(block_size=cfg.block_size, selector=cfg.calibration_selector)
    samples = {layer: {name: arrays[layer][name][:1] for name in ("q", "k")} for layer in layers}
    t0 = time.perf_counter()
    budgets = calibrate_budgets(samples, config, target_recall=cfg.target_recall)
    seconds = time.perf_counter() - t0
    uniform = max(1, int(round(np.mean(budgets.counts))))
    per_layer = []
    for layer in tqdm(layers, desc="(a) budgets", unit="layer", file=sys.stdout):
        q, k, v = (jnp.asarray(arrays[layer][name][row: row + 1]) for name in ("q", "k", "v"))
        dense = jax.nn.dot_product_attention(q, k, v)
        counts = budgets.head_counts(layer)
        calibrated = _select_with_budget(q, k, config, jnp.asarray(counts), kmax=int(counts.max()))
        flat = _select_with_budget(q, k, config, jnp.full(q.shape[2], uniform), kmax=uniform)
        per_layer.append(dict(layer=layer, counts=counts.tolist(),
                              calibrated=judge(q, k, v, calibrated, dense, implementation=cfg.implementation),
                              uniform=judge(q, k, v, flat, dense, implementation=cfg.implementation)))
    mean = lambda which, key: float(np.mean([r[which][key] for r in per_layer]))
    summary = {which: {key: mean(which, key) for key in ("mass", "p05", "density", "output_error")}
               for which in ("calibrated", "uniform")}
    return dict(seconds=round(seconds, 2), uniform_count=uniform, num_k_blocks=budgets.num_k_blocks,
                calibration_density=budgets.density, summary=summary, per_layer=per_layer), budgets


def value_spread(v, order, block: int) -> np.ndarray:
    """Per kv head, the share of V's variance that lies between key blocks when the keys are taken in
    ``order`` [Hkv, L] and cut into blocks of ``block`` (the last one may be short): v [L, Hkv, D].

    Dropping a key block removes its mean value; where blocks differ in value (a high share), a
    selection that drops whole blocks shifts the output more than one that drops a mix."""
    v = np.asarray(v, np.float64)
    shares = []
    for h in range(v.shape[1]):
        vh = v[np.asarray(order[h]), h]
        centred = vh - vh.mean(0)
        between = sum(len(c) * np.sum(c.mean(0) ** 2) for c in np.split(centred, range(block, len(vh), block)))
        shares.append(between / np.sum(centred ** 2))
    return np.asarray(shares)


def part_b(cfg: Config, arrays, layers, row) -> dict:
    per_row = {label: [] for label in SPACE_ROWS}
    cluster_ms, spread = [], []
    for layer in tqdm(layers, desc="(b) spaces", unit="layer", file=sys.stdout):
        q, k, v = (jnp.asarray(arrays[layer][name][row: row + 1]) for name in ("q", "k", "v"))
        dense = jax.nn.dot_product_attention(q, k, v)
        for label, changes in SPACE_ROWS.items():
            config = baatt.BAConfig(block_size=cfg.block_size, sparsity=cfg.sparsity,
                                    cluster_iters=cfg.cluster_iters, **changes)
            sel = baatt.select_blocks(q, k, config)
            per_row[label].append(dict(layer=layer, **judge(q, k, v, sel, dense, implementation=cfg.implementation)))
            if label == "oracle, clustered":
                positional = np.broadcast_to(np.arange(k.shape[1]), (k.shape[2], k.shape[1]))
                spread.append(dict(layer=layer, **{name: value_spread(v[0], order, cfg.block_size).tolist() for name, order
                                                   in (("positional", positional), ("clustered", sel.k_perm[0]))}))
        cluster = jax.jit(lambda q, k: (balanced_kmeans(q, cfg.block_size, iters=cfg.cluster_iters),
                                        balanced_kmeans(k, cfg.block_size, iters=cfg.cluster_iters)))
        cluster_ms.append(1e3 * harness.median_time(lambda: cluster(q, k), target_s=0.5, min_reps=3))
    # Per Lloyd iteration and head: 2 L (L / block) d FLOPs, over dense attention's 4 L^2 d per query head;
    # the keys have kv heads only.
    q_heads, kv_heads = arrays[layers[0]]["q"].shape[2], arrays[layers[0]]["k"].shape[2]
    flops = cfg.cluster_iters / (2 * cfg.block_size) * (1 + kv_heads / q_heads)
    summary = {label: {key: float(np.mean([r[key] for r in rows])) for key in ("mass", "p05", "density", "output_error")}
               for label, rows in per_row.items()}
    return dict(sparsity=cfg.sparsity, summary=summary, per_layer=per_row, cluster_ms=float(np.median(cluster_ms)),
                cluster_flops=flops, value_spread=spread)


def part_c(cfg: Config, arrays, layers, row) -> dict:
    results = []
    for name, threshold in itertools.product(cfg.guard_selectors, cfg.guard_recalls):
        per_layer = []
        for layer in tqdm(layers, desc=f"(c) guard, {name}, {threshold}", unit="layer", file=sys.stdout):
            q, k, v = (jnp.asarray(arrays[layer][part][row: row + 1]) for part in ("q", "k", "v"))
            dense = jax.nn.dot_product_attention(q, k, v)
            config = baatt.BAConfig(block_size=cfg.block_size, sparsity=cfg.sparsity, selector=name)
            out, stats = baatt.attention(q, k, v, config=config.replace(guard_recall=threshold),
                                         return_stats=True, implementation=cfg.implementation)
            plain = baatt.attention(q, k, v, config=config, implementation=cfg.implementation)
            per_layer.append(dict(
                layer=layer, fired=np.asarray(stats.guard.fired)[0].tolist(),
                sampled_recall=np.asarray(stats.guard.recall)[0].round(4).tolist(),
                density=float(jnp.mean(stats.density)), cost=stats.guard.cost,
                output_error=float(error.relative_output_error(out, dense)),
                output_error_unguarded=float(error.relative_output_error(plain, dense))))
        results.append(dict(
            selector=name, guard_recall=threshold, fire_rate=float(np.mean([np.mean(r["fired"]) for r in per_layer])),
            density=float(np.mean([r["density"] for r in per_layer])), cost=per_layer[0]["cost"],
            output_error=float(np.mean([r["output_error"] for r in per_layer])),
            output_error_unguarded=float(np.mean([r["output_error_unguarded"] for r in per_layer])),
            per_layer=per_layer))
    return dict(sparsity=cfg.sparsity, runs=results)


def run(cfg: Config, argv=None) -> tuple[dict, object]:
    t0 = time.time()
    row = 0 if cfg.eval_start is None else 1
    with tempfile.TemporaryDirectory() as workdir:
        arrays, layers, info = capture(cfg, workdir)
        capture_seconds = round(time.time() - t0, 1)
        budgets_result, budgets = part_a(cfg, arrays, layers, row) if "a" in cfg.parts else (None, None)
        spaces = part_b(cfg, arrays, layers, row) if "b" in cfg.parts else None
        guard = part_c(cfg, arrays, layers, row) if "c" in cfg.parts else None
    meta = harness.run_metadata(__spec__.name, argv, layers=layers, seconds=round(time.time() - t0, 1),
                                capture_seconds=capture_seconds, config=dataclasses.asdict(cfg), **info)
    return dict(meta=meta, budgets=budgets_result, spaces=spaces, guard=guard), budgets


def write_table(results: dict, cfg: Config) -> str:
    meta, a, b, c = results["meta"], results["budgets"], results["spaces"], results["guard"]
    window = "the calibration window" if cfg.eval_start is None else f"tokens {cfg.eval_start}..{cfg.eval_start + cfg.length}"
    pct = int(round(100 * cfg.sparsity))
    lines = [
        f"{meta['model']}, {meta['tokens']} tokens of {meta['document']} per window, layers {meta['layers']}, "
        f"{meta['heads']} query / {meta['kv_heads']} kv heads of {meta['head_dim']}, block {cfg.block_size}, "
        f"bidirectional; {harness.describe_run(meta)}; the whole run {meta['seconds']} s (capture of the Q/K/V "
        f"{meta['capture_seconds']} s).",
    ]
    if a is not None:
        lines += [
            "", f"## (a) Per-head budgets: {cfg.calibration_selector} calibrated to oracle recall {cfg.target_recall}",
            "",
            f"Calibration of {len(meta['layers'])} layers x {meta['heads']} heads on tokens 0..{cfg.length}: "
            f"{a['seconds']} s (compilation included); mean density there {a['calibration_density']:.3f}. "
            f"Judged on {window}; 'uniform' keeps {a['uniform_count']} of {a['num_k_blocks']} blocks in every head "
            "(the calibrated mean count, rounded).",
            "",
            "| budget | density | oracle mass | query mass p5 | out err |",
            "|---|---|---|---|---|",
        ]
        for which in ("calibrated", "uniform"):
            s = a["summary"][which]
            lines.append(f"| {which} | {s['density']:.3f} | {s['mass']:.3f} | {s['p05']:.3f} | "
                         f"{s['output_error']:.3f} |")
        lines += ["", "Calibrated counts per layer (heads in order):", ""]
        lines += [f"- layer {r['layer']}: {r['counts']}" for r in a["per_layer"]]
    if b is not None:
        lines += [
            "", f"## (b) Block spaces at {pct}% sparsity", "",
            f"Clustering (balanced k-means, {cfg.cluster_iters} Lloyd iterations, Q and K): {b['cluster_ms']:.1f} ms "
            f"per layer (median, {meta['device']}), {100 * b['cluster_flops']:.2f}% of dense attention's FLOPs.",
            "", "| selection | oracle mass | query mass p5 | density | out err |", "|---|---|---|---|---|",
        ]
        lines += [f"| {label} | {r['mass']:.3f} | {r['p05']:.3f} | {r['density']:.3f} | {r['output_error']:.3f} |"
                  for label, r in b["summary"].items()]
        lines += ["", "Share of V's variance between key blocks (per kv head; high: dropping a block shifts the output "
                  "more), positional / clustered:", ""]
        lines += [f"- layer {r['layer']}: " + ", ".join(f"{p:.3f} / {c:.3f}" for p, c in zip(r["positional"], r["clustered"]))
                  for r in b["value_spread"]]
    if c is not None:
        lines += [
            "", f"## (c) Accuracy guard at {pct}% sparsity", "",
            "Heads densified: the share of (layer, head) pairs whose sampled query block kept less than the "
            "threshold of its exact softmax mass. Check cost: the sampled block's logits over dense attention's FLOPs.",
            "",
            "| selector | threshold | heads densified | density | check cost | out err (guarded) | out err (unguarded) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in c["runs"]:
            lines.append(f"| {r['selector']} | {r['guard_recall']} | {100 * r['fire_rate']:.1f}% | {r['density']:.3f} "
                         f"| {100 * r['cost']:.2f}% | {r['output_error']:.3f} | {r['output_error_unguarded']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    results, budgets = run(cfg, argv)
    table = write_table(results, cfg)
    harness.report_study(cfg.out, results, table)  # makes the output folder
    if budgets is not None:
        budgets.save(f"{cfg.out}/budgets.json", meta=results["meta"])
    return results


if __name__ == "__main__":
    main()
