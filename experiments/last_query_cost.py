"""python -m experiments.last_query_cost                              (one GPU: 128K tokens, B=1 H=32 D=128 bf16)
python -m experiments.last_query_cost --preset cpu_smoke --out /tmp/lq  (CPU: the code path, reference attention)

What ``last_query``'s selection costs against cuDNN's dense forward in the same run, estimated from its
default queries (the last ``last_query_size`` = 64 of the sequence) and from ``given_queries`` given queries
in the middle (``query_positions``: the block a diffusion sampler decodes, ``generate(estimate_from="block")``),
and the end-to-end forward at ``sparsity`` with each. Writes ``results.json`` and ``table.md`` under ``--out``
(default ``experiments/results/last_query_cost/``) and prints the table last.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

import baatt
from baatt.selection import get_selector
from experiments import harness


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "gpu"
    length: int = harness.option(131072, "sequence length (queries and keys)")
    heads: int = harness.option(32, "query (and key) heads")
    head_dim: int = harness.option(128, "head dimension")
    block: int = harness.option(128, "query and key block size")
    sparsity: float = harness.option(0.9, "BA-Att sparsity of the end-to-end forward")
    given_queries: int = harness.option(32, "query positions given to the selector (the second row)")
    target_s: float = harness.option(0.5, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    implementation: str | None = harness.option(None, "baatt.attention implementation; none: the dispatcher's pick")
    out: str = harness.option(harness.study_dir("last_query_cost"), "output folder")


PRESETS = {
    "gpu": Config(),
    "cpu_smoke": Config(preset="cpu_smoke", length=1024, heads=2, head_dim=64, block=64, target_s=0.01,
                        min_reps=1, dense_impl="xla", implementation="reference"),
}


def get_config(preset: str = "gpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def run(cfg: Config, argv=None) -> dict:
    if cfg.length % cfg.block or cfg.length < 2 * cfg.given_queries:
        raise ValueError(f"length must be a multiple of the block ({cfg.block}) and at least 2 * given_queries "
                         f"({2 * cfg.given_queries}); got {cfg.length}")
    t_start = time.time()
    q, k, v = harness.synthetic_inputs(cfg.length, heads=cfg.heads, head_dim=cfg.head_dim, dtype=jnp.bfloat16)
    timed = lambda call: 1e3 * harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)  # noqa: E731
    dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=cfg.dense_impl))
    dense_ms = timed(lambda: dense(q, k, v))
    config = baatt.BAConfig(selector="last_query", sparsity=cfg.sparsity, block_size=cfg.block)
    select = jax.jit(lambda q, k, p: get_selector("last_query").select(q, k, config, query_positions=p))
    full = jax.jit(lambda q, k, v, p: baatt.attention(q, k, v, config=config, implementation=cfg.implementation,
                                                       query_positions=p))
    middle = cfg.length // 2
    rows = []
    for name, positions in ((f"last {config.last_query_size} (default)", None),
                            (f"{cfg.given_queries} given", jnp.arange(middle, middle + cfg.given_queries)[None])):
        select_ms = timed(lambda: select(q, k, positions))
        full_ms = timed(lambda: full(q, k, v, positions))
        rows.append(dict(queries=name, select_ms=select_ms, select_share=select_ms / dense_ms, full_ms=full_ms,
                         speedup=dense_ms / full_ms))
    meta = harness.run_metadata(__spec__.name, argv, seconds=round(time.time() - t_start, 1),
                                config=dataclasses.asdict(cfg))
    return dict(meta=meta, dense_fwd_ms=dense_ms, rows=rows)


def table(result: dict, cfg: Config) -> str:
    lines = [f"# last_query_cost: {harness.describe_run(result['meta'])}", "",
             f"B=1 H={cfg.heads} D={cfg.head_dim} bf16, {harness.format_length(cfg.length)} tokens, block "
             f"{cfg.block}; dense forward ({cfg.dense_impl}) {result['dense_fwd_ms']:.2f} ms, same run.", "",
             f"| last_query from | select ms (share of dense fwd) | forward at {cfg.sparsity:.0%} ms | x dense |",
             "|---|---|---|---|"]
    lines += [f"| {r['queries']} | {r['select_ms']:.2f} ({100 * r['select_share']:.2f}%) | {r['full_ms']:.2f} | "
              f"{r['speedup']:.2f}x |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    result = run(cfg, argv)
    harness.report_study(cfg.out, result, table(result, cfg))
    return result


if __name__ == "__main__":
    main()
