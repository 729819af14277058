"""python -m experiments.last_query_cost                              (one GPU: 128K tokens, B=1 H=32 D=128 bf16)
python -m experiments.last_query_cost --dry --length 1024 --out /tmp/lq (CPU: the code path, reference attention)

What ``last_query``'s selection costs against cuDNN's dense forward in the same run, estimated from its
default queries (the last ``last_query_size`` = 64 of the sequence) and from 32 given queries in the middle
(``query_positions``: the block a diffusion sampler decodes, ``generate(estimate_from="block")``), and the
end-to-end forward at 90% sparsity with each. Writes ``results.json`` and ``table.md`` under ``--out``
(default ``experiments/results/last_query_cost/``) and prints the table last.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import baatt
from baatt.selection import get_selector
from experiments import harness

GIVEN_QUERIES = 32


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072, help="sequence length (tokens)")
    parser.add_argument("--dry", action="store_true", help="CPU: 2 heads of 64, block 64, XLA dense, reference "
                        "BA-Att (times mean nothing)")
    parser.add_argument("--out", default="experiments/results/last_query_cost", help="output folder")
    args = parser.parse_args(argv)
    heads, head_dim, block = (2, 64, 64) if args.dry else (32, 128, 128)
    if args.length % block or args.length < 2 * GIVEN_QUERIES:
        raise ValueError(f"length must be a multiple of the block ({block}) and at least {2 * GIVEN_QUERIES}; "
                         f"got {args.length}")
    q, k, v = harness.synthetic_inputs(args.length, heads=heads, head_dim=head_dim, dtype=jnp.bfloat16)
    timed = lambda f: 1e3 * harness.median_time(f, target_s=0.5, min_reps=3)  # noqa: E731
    dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="xla" if args.dry else "cudnn"))
    dense_ms = timed(lambda: dense(q, k, v))
    config = baatt.BAConfig(selector="last_query", sparsity=0.9, block_size=block)
    implementation = "reference" if args.dry else None
    middle = args.length // 2
    rows = []
    for name, positions in (("last 64 (default)", None),
                            (f"{GIVEN_QUERIES} given", jnp.arange(middle, middle + GIVEN_QUERIES)[None])):
        select = jax.jit(lambda q, k, p: get_selector("last_query").select(q, k, config, query_positions=p))
        full = jax.jit(lambda q, k, v, p: baatt.attention(q, k, v, config=config, implementation=implementation,
                                                           query_positions=p))
        select_ms = timed(lambda: select(q, k, positions))
        full_ms = timed(lambda: full(q, k, v, positions))
        rows.append(dict(queries=name, select_ms=select_ms, select_share=select_ms / dense_ms, full_ms=full_ms,
                         speedup=dense_ms / full_ms))
    result = dict(meta=harness.run_metadata(__spec__.name, argv), length=args.length, heads=heads,
                  head_dim=head_dim, block=block, sparsity=0.9, dense_fwd_ms=dense_ms,
                  dense="xla" if args.dry else "cudnn", rows=rows)
    table = [f"# last_query's cost ({harness.describe_run(result['meta'])})", "",
             f"B=1 H={heads} D={head_dim} bf16, {args.length} tokens, block {block}; dense forward "
             f"({result['dense']}) {dense_ms:.2f} ms.", "",
             "| last_query from | select ms (share of dense fwd) | forward at 90% ms | x dense |", "|---|---|---|---|"]
    table += [f"| {r['queries']} | {r['select_ms']:.2f} ({100 * r['select_share']:.2f}%) | {r['full_ms']:.2f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    harness.write_results(args.out, {"results.json": result, "table.md": "\n".join(table) + "\n"})
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()
