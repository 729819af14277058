"""python -m experiments.selectors_real_qk

Which block selector keeps the attention that real queries need, on average and for the worst
queries? Every selector row below (the peers, BA-Att's recipe, the token-level estimators, and the
two oracles as yardsticks) runs on the post-rotary Q/K/V of SmolLM2-135M-Instruct (captured with
``baatt.nn.capture_qkv`` over the 2010 State of the Union address), attended bidirectionally and
causally, at each sparsity and block size. Per row it reports (docs/spec.md sections 1, 10.1):

- mass: the oracle mass ``M_hat`` the selection keeps, averaged over query blocks, heads, layers
  (judged in the selection's own block space: a sorted row against the sorted oracle);
- per-query tails (``baatt.reference.error.query_mass``, pooled over every query token, head and
  layer): the 5th percentile of the softmax mass a query keeps and the share of queries keeping
  less than half of it;
- out err: ``||out - dense|| / ||dense||`` of the block-sparse output, averaged over layers;
- FLOPs: the estimator's cost as a fraction of bidirectional dense attention's ``4 L^2 d`` per
  query head, from the formula in each selector's docstring (not measured). The oracles pay a
  dense pass; "random" is free.

Two more parts, each behind its flag: ``--ablation`` adds BA-Att's sorting (of Q, of K, of both) crossed
with its compensation (off, beta 0.5, beta 1); the sorted rows run bidirectionally only, since sorting
is refused under a causal mask (and SmolLM2, a causal model, attended bidirectionally is off its
training distribution), compensation alone under both masks; ``--bound`` correlates, per layer, the
deviation bound U of docs/spec.md section 2 (``baatt.reference.error.bound``) with the actual largest
deviation of a token logit from its pooled block logit (``error.logit_deviation``).
``--no-selector-rows`` leaves the main rows out, so that a long run splits into parts
(experiments/results/selectors_real_qk/README.md lists them).

Under the causal mask the budget is a fraction of each query block's allowed key blocks and the
diagonal blocks are always kept (``baatt.BAConfig.mask``); the sorted BA-Att row does not apply.

CPU defaults: 2,048 tokens, layers 0, 7, 15 and 29 (about 15 minutes on two CPU cores, half of it
compiling: one program per selector row, mask and block size). The full study, 8,192 tokens
and every layer, is ``--length 8192 --layers none`` on a GPU. Needs the SmolLM2 GGUF
(``bash scripts/setup_data.sh``). Writes ``results.json`` and ``table.md`` to ``--out`` (default
``experiments/results/selectors_real_qk/``).
"""

from __future__ import annotations

import dataclasses
import functools
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
from baatt.selection import MixedParams, QueryTokenParams, QuestParams, get_selector
from experiments import harness
from experiments.selector_flops import flop_fraction

MASKS = ("bidirectional", "causal")


@dataclasses.dataclass(frozen=True)
class Row:
    """One selector row: a registered selector, the config changes it runs with, and whether it applies
    under a causal mask."""

    label: str
    selector: str
    changes: tuple[tuple[str, object], ...] = ()
    causal: bool = True  # False: the row needs sorting, which a causal mask forbids

    def config(self, block: int, sparsity: float, mask: str) -> baatt.BAConfig:
        return baatt.BAConfig(block_size=block, sparsity=sparsity, selector=self.selector, mask=mask,
                              **dict(self.changes))


ROWS = {
    "oracle": Row("oracle (mean mass)", "oracle"),
    "max_oracle": Row("max-oracle (max mass)", "max_oracle"),
    "baatt_paper": Row("baatt (sort Q+K, beta 1)", "baatt",
                       (("sort_q", True), ("sort_k", True), ("compensate", True), ("beta", 1.0)), causal=False),
    "meanpool": Row("meanpool", "meanpool"),
    "meanpool_sink": Row("meanpool + sink", "meanpool", (("force_sink", True),)),
    "xattention": Row("xattention (stride 8)", "xattention"),
    "last_query": Row("last_query (64, gamma 0.9)", "last_query"),
    "sparge_like": Row("sparge_like", "sparge_like"),
    "query_token": Row("query_token (mean)", "query_token"),
    "query_token_max": Row("query_token (max)", "query_token",
                           (("selector_params", QueryTokenParams(aggregate="max")),)),
    "query_token_lse": Row("query_token (logsumexp)", "query_token",
                           (("selector_params", QueryTokenParams(aggregate="logsumexp")),)),
    "quest": Row("quest (mean)", "quest"),
    "quest_max": Row("quest (max)", "quest", (("selector_params", QuestParams(aggregate="max")),)),
    "mixed": Row("mixed (1 probe, 16x16 groups)", "mixed"),
    "mixed_sink": Row("mixed + sink", "mixed", (("force_sink", True),)),
    "mixed_blend": Row("mixed (ranked by (P + G) / 2)", "mixed", (("selector_params", MixedParams(blend=0.5)),)),
    "mixed_blend_sink": Row("mixed (ranked by (P + G) / 2) + sink", "mixed",
                            (("selector_params", MixedParams(blend=0.5)), ("force_sink", True))),
    "mixed_probe_heavy": Row("mixed (ranked by 0.75 P + 0.25 G)", "mixed", (("selector_params", MixedParams(blend=0.75)),)),
    "mixed_group_heavy": Row("mixed (ranked by 0.25 P + 0.75 G)", "mixed", (("selector_params", MixedParams(blend=0.25)),)),
    "proxy": Row("proxy (stride 16)", "proxy"),
    "pooled_query": Row("pooled_query (block-mean query)", "pooled_query"),
    "pooled_query_sink": Row("pooled_query + sink", "pooled_query", (("force_sink", True),)),
    "random": Row("random", "random"),
}

# The mixed estimator's rankings other than its default (half the budget from each estimate) run on request.
DEFAULT_ROWS = tuple(name for name in ROWS if not name.startswith(("mixed_blend", "mixed_probe", "mixed_group")))

# BA-Att's sorting and compensation switched on one at a time (``--ablation``): mean-pooled estimates
# of sorted blocks, with and without the compensation term at two strengths. Sorting reorders the
# tokens, which a causal mask forbids, so the sorted rows run bidirectionally only; the unsorted ones
# (compensation alone) run under both masks.
ABLATION_ROWS = {
    f"{name}{'_comp' + str(beta).replace('.', '') if beta else ''}": Row(
        f"baatt ({label}{f', beta {beta}' if beta else ''})", "baatt",
        (("sort_q", sort_q), ("sort_k", sort_k), ("compensate", bool(beta)), ("beta", beta or 1.0)),
        causal=not (sort_q or sort_k))
    for name, label, sort_q, sort_k in (("unsorted", "no sort", False, False), ("sort_q", "sort Q", True, False),
                                        ("sort_k", "sort K", False, True), ("sort_qk", "sort Q+K", True, True))
    for beta in (0.0, 0.5, 1.0)
}


@dataclasses.dataclass(frozen=True)
class Config:
    length: int = harness.option(2048, "tokens of the document fed to the model (at most 8192, its context)")
    layers: tuple[int, ...] | None = harness.option((0, 7, 15, 29), "layers whose Q/K/V are studied; none: all")
    block_sizes: tuple[int, ...] = harness.option((64, 128), "query and key block sizes")
    sparsities: tuple[float, ...] = harness.option((0.5, 0.7, 0.9, 0.95), "fixed-budget sparsities")
    masks: tuple[str, ...] = harness.option(MASKS, "attention masks the selections are made and judged under",
                                            choices=MASKS)
    rows: tuple[str, ...] = harness.option(DEFAULT_ROWS, "selector rows", choices=tuple(ROWS))
    selector_rows: bool = harness.option(True, "run the selector rows of --rows")
    ablation: bool = harness.option(False, "run the sort x compensation rows (sorted ones bidirectionally only)")
    bound: bool = harness.option(False, "correlate the deviation bound U with the actual logit deviation")
    text: str = harness.option("sotu/2010_barack_obama_d.txt", "the document, under <data dir>/raw/")
    out: str = harness.option(harness.study_dir("selectors_real_qk"), "output folder")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def kept_share(sel: baatt.BlockSelection, config: baatt.BAConfig, length: int) -> float:
    """Kept key blocks over the key blocks the mask allows, averaged over query blocks and heads: the
    budget actually spent (the sparsity's complement, more where forced blocks exceed it)."""
    allowed, _ = config.mask.block_pairs(length, length, config.block_q, config.block_k)
    return float(np.mean(np.asarray(sel.counts) / allowed.sum(-1)))


def bound_against_deviation(q, k, block: int, mask: baatt.AttentionMask) -> dict:
    """How the deviation bound U (docs/spec.md section 2) tracks the actual largest deviation of a
    token logit from its pooled block logit, over the block pairs the mask allows, pooled over heads:
    their Pearson correlation, means, and the largest and mean ratio deviation / U (at most 1 where the
    bound holds)."""
    u = error.bound(q, k, block_size=block, mask=mask)
    dev = error.logit_deviation(q, k, block_size=block, mask=mask, reduce="max")
    allowed, _ = mask.block_pairs(q.shape[1], k.shape[1], block, block)
    live = jnp.broadcast_to(jnp.asarray(allowed), u.shape)
    ratio = jnp.where(live, dev / jnp.maximum(u, 1e-9), 0.0)
    return dict(pearson=float(error.pearson(u, dev, mask=live.ravel())),
                bound_mean=float(jnp.sum(jnp.where(live, u, 0.0)) / jnp.sum(live)),
                deviation_mean=float(jnp.sum(jnp.where(live, dev, 0.0)) / jnp.sum(live)),
                ratio_max=float(jnp.max(ratio)), ratio_mean=float(jnp.sum(ratio) / jnp.sum(live)))


@functools.partial(jax.jit, static_argnums=(2,))
def _select_at_every_budget(q, k, configs: tuple[baatt.BAConfig, ...]):
    """One compiled program per row: the scores are computed once and every budget applied to them."""
    return tuple(get_selector(c.selector).select(q, k, c, key_mask=None) for c in configs)


def capture(cfg: Config, workdir: str) -> tuple[dict, list[int], dict]:
    """SmolLM2's Q/K/V of the chosen layers over the document's first ``cfg.length`` tokens, memory-mapped."""
    _, model, tokenizer = load_smollm2(progress=False)
    ids = tokenizer.encode((data_dir() / "raw" / cfg.text).read_text())
    if len(ids) < cfg.length:
        raise ValueError(f"length must be at most the document's {len(ids)} tokens; got {cfg.length}")
    layers = range(model.cfg.num_layers) if cfg.layers is None else cfg.layers
    arrays = capture_qkv(model, jnp.asarray([ids[: cfg.length]], jnp.int32), layers=layers, out_dir=workdir)
    info = dict(model="SmolLM2-135M-Instruct (GGUF Q4_1)", document=cfg.text, tokens=cfg.length,
                heads=model.cfg.num_heads, kv_heads=model.cfg.num_kv_heads, head_dim=model.cfg.head_dim)
    return arrays, sorted(arrays), info


def run(cfg: Config, argv=None) -> dict:
    t0 = time.time()
    rows = {name: ROWS[name] for name in cfg.rows} if cfg.selector_rows else {}
    if cfg.ablation:
        rows |= ABLATION_ROWS
    per_query: dict[tuple, list[np.ndarray]] = {}  # (mask, block, row, sparsity) -> per-layer query masses
    per_layer: dict[tuple, list[dict]] = {}
    bounds = []
    with tempfile.TemporaryDirectory() as workdir:
        arrays, layers, info = capture(cfg, workdir)
        jobs = [(layer, mask, block) for layer in layers for mask in cfg.masks for block in cfg.block_sizes]
        for layer, mask, block in tqdm(jobs, desc="layer x mask x block", unit="set", file=sys.stdout):
            q, k, v = (jnp.asarray(arrays[layer][name]) for name in ("q", "k", "v"))
            dense, _ = reference.dense_attention(q, k, v, mask=baatt.AttentionMask(mask))
            if cfg.bound:
                bounds.append(dict(layer=layer, mask=mask, block_size=block,
                                   **bound_against_deviation(q, k, block, baatt.AttentionMask(mask))))
            oracle_maps = {}
            for name, row in rows.items():
                if mask != "bidirectional" and not row.causal:
                    continue
                configs = tuple(row.config(block, s, mask) for s in cfg.sparsities)
                for s, config, sel in zip(cfg.sparsities, configs, _select_at_every_budget(q, k, configs)):
                    space = (sel.q_perm is None, sel.k_perm is None)
                    if space not in oracle_maps:
                        oracle_maps[space] = reference.post_downsample_map(
                            q, k, block_size=block, q_perm=sel.q_perm, k_perm=sel.k_perm, mask=config.mask)
                    key = (mask, block, name, s)
                    per_query.setdefault(key, []).append(np.asarray(error.query_mass(q, k, sel)))
                    out, _ = reference.block_sparse_attention(q, k, v, sel)
                    per_layer.setdefault(key, []).append(dict(
                        layer=layer,
                        mass=float(jnp.mean(error.selected_mass(oracle_maps[space], sel))),
                        output_error=float(error.relative_output_error(out, dense)),
                        kept=kept_share(sel, config, q.shape[1]),
                        flops=flop_fraction(config, length=q.shape[1], q_heads=q.shape[2], kv_heads=k.shape[2]),
                    ))
    results = []
    for (mask, block, name, s), layer_rows in per_layer.items():
        tails = error.query_mass_tails(np.concatenate([m.ravel() for m in per_query[(mask, block, name, s)]]))
        results.append(dict(
            mask=mask, block_size=block, row=name, label=rows[name].label, selector=rows[name].selector,
            sparsity=s, mass=float(np.mean([r["mass"] for r in layer_rows])),
            query_mass_mean=float(tails["mean"]), query_mass_p05=float(tails["low_quantile"]),
            below_half=float(tails["below_threshold"]),
            output_error=float(np.mean([r["output_error"] for r in layer_rows])),
            kept=float(np.mean([r["kept"] for r in layer_rows])), flops=layer_rows[0]["flops"],
            per_layer=layer_rows,
        ))
    meta = harness.run_metadata(__spec__.name, argv, layers=layers, rows=list(rows), seconds=round(time.time() - t0, 1),
                                config=dataclasses.asdict(cfg), **info)
    return dict(meta=meta, results=results, bound=bounds)


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def headline(results: dict, cfg: Config) -> list[str]:
    """Per mask, block size and sparsity: the best estimator (not an oracle, not random) by mean mass and by
    5th percentile, among the rows that spent no more budget than the oracle (forced blocks can add some)."""
    lines = []
    by = {(r["mask"], r["block_size"], r["sparsity"], r["row"]): r for r in results["results"]}
    for mask in cfg.masks:
        for block in cfg.block_sizes:
            parts = []
            for s in cfg.sparsities:
                oracle = by.get((mask, block, s, "oracle"))
                here = [r for r in results["results"]
                        if (r["mask"], r["block_size"], r["sparsity"]) == (mask, block, s)
                        and r["selector"] not in ("oracle", "max_oracle", "random")
                        and (oracle is None or r["kept"] <= oracle["kept"] + 1e-3)]
                if not here:
                    continue
                best = max(here, key=lambda r: r["mass"])
                tail = max(here, key=lambda r: r["query_mass_p05"])
                ref = "" if oracle is None else f" (oracle {_fmt(oracle['mass'])}, p5 {_fmt(oracle['query_mass_p05'])})"
                parts.append(f"{int(round(s * 100))}%: {best['label']} {_fmt(best['mass'])}, "
                             f"p5 {tail['label']} {_fmt(tail['query_mass_p05'])}{ref}")
            lines.append(f"- {mask}, block {block}: " + "; ".join(parts))
    return lines


def write_table(results: dict, cfg: Config) -> str:
    meta = results["meta"]
    pct = [f"{int(round(s * 100))}%" for s in cfg.sparsities]
    lines = [
        f"{meta['model']}, {meta['tokens']} tokens of {meta['document']}, layers {meta['layers']}, "
        f"{meta['heads']} query / {meta['kv_heads']} kv heads of {meta['head_dim']}; {harness.describe_run(meta)}.",
        "",
        "mass: oracle mass kept (mean over query blocks, heads, layers). p5 / <0.5: 5th percentile of the mass a",
        "query token keeps, and the share of query tokens keeping less than half (pooled over tokens, heads,",
        "layers). out err: relative output error against dense attention under the same mask. FLOPs: the",
        "estimator's cost over bidirectional dense attention, from its docstring's formula. kept: the share of",
        "the allowed key blocks kept at each sparsity (above 1 - sparsity where forced blocks exceed the budget).",
        "",
        "Best estimator by mean mass and by 5th percentile (oracles, random and rows whose forced blocks",
        "spent more than the oracle's budget excluded):",
        "",
        *headline(results, cfg),
    ]
    by = {(r["mask"], r["block_size"], r["row"], r["sparsity"]): r for r in results["results"]}
    for mask in cfg.masks:
        for block in cfg.block_sizes:
            if not any((m, b) == (mask, block) for m, b, _, _ in by):
                continue
            heading = f"{mask}, block {block}"
            if mask == "bidirectional":
                heading += " (off-distribution: SmolLM2 is a causal model)"
            lines += [
                "", f"### {heading}", "",
                "| selector | FLOPs | kept | " + " | ".join(f"mass {p}" for p in pct) + " | "
                + " | ".join(f"p5 {p}" for p in pct) + " | " + " | ".join(f"<0.5 {p}" for p in pct) + " | "
                + " | ".join(f"out err {p}" for p in pct) + " |",
                "|---" * (3 + 4 * len(pct)) + "|",
            ]
            for name in results["meta"]["rows"]:
                cells = [by.get((mask, block, name, s)) for s in cfg.sparsities]
                if cells[0] is None:
                    continue
                lines.append(
                    f"| {cells[0]['label']} | {100 * cells[0]['flops']:.2f}% | "
                    + "/".join(_fmt(r["kept"], 2) for r in cells) + " | "
                    + " | ".join(_fmt(r["mass"]) for r in cells) + " | "
                    + " | ".join(_fmt(r["query_mass_p05"]) for r in cells) + " | "
                    + " | ".join(_fmt(r["below_half"]) for r in cells) + " | "
                    + " | ".join(_fmt(r["output_error"]) for r in cells) + " |"
                )
    if results["bound"]:
        lines += [
            "", "### Deviation bound U against the actual logit deviation", "",
            "Per layer: Pearson correlation over the allowed block pairs and heads of U and the largest",
            "|l_ij - l_bar| of the pair, their means, and the largest and mean ratio deviation / U.", "",
            "| mask | block | layer | pearson | mean U | mean deviation | max ratio | mean ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for b in results["bound"]:
            lines.append(f"| {b['mask']} | {b['block_size']} | {b['layer']} | {_fmt(b['pearson'])} | "
                         f"{_fmt(b['bound_mean'], 2)} | {_fmt(b['deviation_mean'], 2)} | {_fmt(b['ratio_max'])} | "
                         f"{_fmt(b['ratio_mean'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    results = run(cfg, argv)
    table = write_table(results, cfg)
    harness.report_study(cfg.out, results, table)
    return results


if __name__ == "__main__":
    main()
