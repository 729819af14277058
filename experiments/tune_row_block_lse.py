"""python -m experiments.tune_row_block_lse                       (one GPU: 128K tokens, both masks)
python -m experiments.tune_row_block_lse --preset cpu_smoke --out /tmp/smoke   (CPU, interpret mode: the code path)

How fast the ``pooled_query`` selector's kernel (``baatt.kernels.pallas_triton.row_block_lse``) runs
under each tiling (rows per program, warps), against cuDNN's dense forward under the same mask in the
same run. The kernel's rows are the mean queries of the query blocks, exactly as the selector builds
them (``pooled_query.pooled_rows``), on the structured synthetic Q/K of ``harness.synthetic_inputs``
(B=1, H=32, D=128, bf16, block 128 by default).

Each program of the kernel reads every key of its head, so the row tile sets how many times K is read
from memory (``Nq / row_tile`` times per head): a larger tile reads K fewer times but holds a larger
[row_tile, block_k] tile of logits in registers. Every tiling's output is compared with the first one
in ``--tilings`` (the same numbers up to float rounding; the ``-inf`` pattern identical); the kernel
itself is checked against its XLA reference by ``tests/test_kernel_row_block_lse.py`` (GPU-marked twin
included). The selection around the kernel (pooling, softmax over blocks, top-k) is the same for every
tiling: ``bench_selectors`` times it end to end with the default tiling.

Writes ``results.json`` and ``table.md`` under ``--out`` (default
``experiments/results/tune_row_block_lse/``) and prints the table last.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import numpy as np

import baatt
from baatt.kernels.pallas_triton import row_block_lse
from baatt.selection import pooled_query
from baatt.selection.common import positional_space
from experiments import harness


def parse_tiling(text: str) -> tuple[int, int]:
    """'ROWSxWARPS' -> (rows, warps)."""
    rows, sep, warps = text.partition("x")
    if not sep or not rows.isdigit() or not warps.isdigit():
        raise ValueError(f"a tiling is ROWSxWARPS, e.g. 128x8; got {text!r}")
    return int(rows), int(warps)


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "gpu"
    length: int = harness.option(131072, "sequence length (queries and keys)")
    heads: int = harness.option(32, "query (and key) heads")
    head_dim: int = harness.option(128, "head dimension")
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    causal: tuple[bool, ...] = harness.option((False, True), "masks to run: false bidirectional, true causal")
    tilings: tuple[tuple[int, int], ...] = harness.option(
        # the kernel's default first (the reference), then the others once each
        tuple(dict.fromkeys(((row_block_lse.ROW_TILE, row_block_lse.NUM_WARPS), (64, 4), (64, 8), (128, 4),
                             (128, 8), (256, 8), (256, 16)))),
        "ROWSxWARPS tilings, the first the reference of the comparison")
    target_s: float = harness.option(0.5, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    interpret: bool = harness.option(False, "Pallas interpret mode (CPU smoke runs)")
    out: str = harness.option(harness.study_dir("tune_row_block_lse"), "output folder")


PRESETS = {
    "gpu": Config(),
    "cpu_smoke": Config(preset="cpu_smoke", length=512, heads=2, head_dim=64, block=64, dtype="float32",
                        tilings=((64, 4), (16, 4), (128, 8)), target_s=0.01, min_reps=1, dense_impl="xla",
                        interpret=True),
}


def get_config(preset: str = "gpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def run(cfg: Config, argv=None) -> dict:
    t_start = time.time()
    q, k, v = harness.synthetic_inputs(cfg.length, heads=cfg.heads, head_dim=cfg.head_dim, dtype=cfg.dtype)
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    rows = []
    for causal in cfg.causal:
        dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=cfg.dense_impl,
                                          is_causal=causal))
        t_dense = tm(lambda: dense(q, k, v))
        mask = baatt.AttentionMask.causal() if causal else baatt.AttentionMask()
        config = baatt.BAConfig(selector="pooled_query", block_size=cfg.block, mask=mask)
        space = positional_space(q, k, config)
        pooled, limits = pooled_query.pooled_rows(space)
        pooled = pooled.astype(k.dtype)  # as the selector feeds the kernel
        reference = None
        for tile, warps in cfg.tilings:
            row = dict(mask="causal" if causal else "bidirectional", row_tile=tile, num_warps=warps,
                       cudnn_fwd_ms=1e3 * t_dense)
            try:
                kernel = jax.jit(functools.partial(
                    row_block_lse.row_block_logsumexp, scale=1 / math.sqrt(cfg.head_dim), block_k=cfg.block,
                    row_tile=tile, num_warps=warps, interpret=cfg.interpret))
                got = np.asarray(kernel(pooled, space.k, space.kv_valid, limits))
                reference = got if reference is None else reference
                finite = np.isfinite(reference)
                t_kernel = tm(lambda: kernel(pooled, space.k, space.kv_valid, limits))
                row.update(kernel_ms=1e3 * t_kernel, kernel_frac_cudnn=t_kernel / t_dense,
                           max_abs_diff=float(np.max(np.abs(got[finite] - reference[finite]), initial=0.0)),
                           same_neg_inf=bool(np.array_equal(np.isneginf(got), np.isneginf(reference))))
            except Exception as e:  # noqa: BLE001  (a tiling that fails to lower or run is reported)
                row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            rows.append(row)
            print(row, flush=True)
    meta = harness.run_metadata(__spec__.name, argv, seconds=round(time.time() - t_start, 1),
                                config=dataclasses.asdict(cfg))
    return dict(meta=meta, rows=rows)


def table(result: dict, cfg: Config) -> str:
    lines = [f"# tune_row_block_lse: {harness.describe_run(result['meta'])}", "",
             f"B=1 H={cfg.heads} D={cfg.head_dim} {cfg.dtype}, {harness.format_length(cfg.length)} tokens, block "
             f"{cfg.block}: pooled_query's kernel alone (one pooled row per query block against every key), "
             f"median ms, and its share of {cfg.dense_impl}'s dense forward under the same mask, same run. "
             f"diff: largest difference from the first tiling's output.", "",
             "| mask | rows x warps | kernel ms | share of dense fwd | dense fwd ms | diff | -inf same |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mask']} | {r['row_tile']}x{r['num_warps']} | {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['mask']} | {r['row_tile']}x{r['num_warps']} | {r['kernel_ms']:.2f} | "
                     f"{100 * r['kernel_frac_cudnn']:.2f}% | {r['cudnn_fwd_ms']:.2f} | {r['max_abs_diff']:.1e} | "
                     f"{r['same_neg_inf']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS),
                               parsers={"tilings": parse_tiling})
    result = run(cfg, argv)
    harness.report_study(cfg.out, result, table(result, cfg))
    return result


if __name__ == "__main__":
    main()
