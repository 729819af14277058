"""python -m experiments.bench_estimator

Cost of the BA-Att estimator variants against cuDNN dense attention, on a GPU.

For each length and sparsity (B=1, H=32, D=128, bf16, block 128, the structured synthetic
Q/K/V of ``baatt.synthetic``): the time of ``select_blocks`` (statistics, scores, top-k;
with norm sorting also the argsorts of the norms) for the plain estimator, with
compensation, with norm sorting of Q and K, and with both (the paper's recipe), and of
``baatt.attention`` end to end for each (sorting adds the permutations of Q/K/V and the
inverse permutation of the output), both as a fraction of cuDNN's dense forward time
measured in the same run. Also the sparse kernel alone on the same selection, prepared
beforehand (block space for sorted selections, the caller's layout otherwise, as the
pipeline does): end to end minus kernel is what estimating and permuting cost inside the
compiled pipeline, where XLA shares the sorted Q/K gathers between the statistics and the
kernel's inputs (``overhead``). Per length and variant (at the first sparsity) also the cost
of each part, as prefixes that XLA compiles on their own and their differences: norm sorts,
block statistics, pooled scores, top-k selection, and the permutations of Q/K/V into sorted
block space plus the inverse permutation of an output-sized array. Also which sorts and
custom calls the compiled estimator holds (whether XLA handed the norm sorts to CUB's radix
sort, what top-k became). For the plain estimator also the fixed-budget selection alone,
XLA's route against the Pallas top-k kernel on the same scores (time, and whether they agree
exactly); per length the norm sorts alone by each ``argsort_rows`` method (time, agreement,
what XLA compiled them into). Writes ``<name>.json`` / ``.md`` under ``--out`` (default
``experiments/results/bench_estimator/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp

import baatt
from baatt import api, layout
from baatt.kernels import BACKENDS
from baatt.selection import estimator, sorting
from baatt.selection.budget import select_from_scores
from experiments import harness

VARIANTS = {
    "plain": dict(),
    "compensate": dict(compensate=True, beta=0.5),
    "sorted": dict(sort_q=True, sort_k=True),
    "sorted+compensate": dict(sort_q=True, sort_k=True, compensate=True, beta=1.0),
}
HEADS, HEAD_DIM, BLOCK = 32, 128, 128


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((32768, 131072), "sequence lengths")
    sparsities: tuple[float, ...] = harness.option((0.5, 0.9), "fixed-budget sparsities")
    impl: str | None = harness.option(None, "baatt.attention implementation (none: the best available)")
    target_s: float = harness.option(0.3, "timing budget per measurement after warm-up (s)")
    dense_impl: str = harness.option("cudnn", "dense baseline's implementation (xla for a CPU smoke run)")
    parts: bool = harness.option(True, "time each part of the estimator")
    row_argsort: str | None = harness.option(
        None, "norm sorts' argsort_rows method for this run (none: baatt.selection.sorting.ROW_ARGSORT)",
        choices=sorting.ROW_ARGSORT_METHODS)
    name: str = harness.option("bench_estimator", "output file stem")
    out: str = harness.option(harness.study_dir("bench_estimator"), "output folder")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def part_times(q, k, v, bcfg, tm) -> dict:
    """Milliseconds of each estimator part (prefix differences; see the module docstring)."""
    sort = jax.jit(lambda q, k: estimator.sort_permutations(q, k, bcfg))
    stats = jax.jit(lambda q, k: (lambda e: (e.q_stats, e.k_stats))(estimator.estimate(q, k, bcfg)))
    scores = jax.jit(lambda q, k: estimator.estimate(q, k, bcfg).scores)
    select = jax.jit(lambda q, k: baatt.select_blocks(q, k, bcfg))
    sorted_space = bcfg.sort_q or bcfg.sort_k
    t = dict(sort=tm(lambda: sort(q, k)) if sorted_space else 0.0)
    t["stats"] = tm(lambda: stats(q, k)) - t["sort"]
    t["scores"] = tm(lambda: scores(q, k)) - t["sort"] - t["stats"]
    t["topk"] = tm(lambda: select(q, k)) - t["sort"] - t["stats"] - t["scores"]
    t["permute"] = 0.0
    if sorted_space:
        qp, kp = jax.block_until_ready(sort(q, k))

        @jax.jit
        def permute(q, k, v, qp, kp):
            sp = layout.to_block_space(q, k, v, block_q=bcfg.block_q, block_k=bcfg.block_k, q_perm=qp, k_perm=kp)
            # sp.q stands in for the kernel's output (same shape) on its way back to positional order.
            back = layout.from_block_space(sp.q, sp.q[..., 0].astype("float32"), length_q=q.shape[1], q_perm=qp)
            return sp.k, sp.v, back

        t["permute"] = tm(lambda: permute(q, k, v, qp, kp))
    return {name: 1e3 * max(sec, 0.0) for name, sec in t.items()}


def sort_method_times(q, k, tm) -> dict:
    """The norm sorts of Q and K (``norm_sort`` permutations only) by each ``argsort_rows`` method:
    milliseconds, whether the permutations are identical, and what XLA compiled each into."""
    out, perms = {}, {}
    for method in sorting.ROW_ARGSORT_METHODS:
        fn = jax.jit(lambda q, k, m=method: (sorting.norm_sort(q, method=m)[0], sorting.norm_sort(k, method=m)[0]))
        perms[method] = jax.block_until_ready(fn(q, k))
        out[f"{method}_ms"] = 1e3 * tm(lambda: fn(q, k))
        out[f"{method}_calls"] = compiled_calls(fn, q, k)
    first, *rest = perms.values()
    out["identical"] = all(bool(jnp.array_equal(a, b)) for other in rest for a, b in zip(first, other))
    return out


def compiled_calls(fn, *args) -> list[str]:
    """Custom-call targets and sort ops of ``fn``'s optimised HLO: shows whether XLA handed a sort
    to CUB (``__cub$DeviceRadixSort...``) or kept its own comparison sort, and what top-k became."""
    text = fn.lower(*args).compile().as_text()
    found = re.findall(r'custom_call_target="([^"]+)"', text)
    found += ["sort"] * len(re.findall(r"(?:= [^ (]+|\)) sort\(", text))  # one result, or a tuple of them
    return sorted(set(found))


def topk_times(q, k, bcfg, tm) -> dict:
    """The fixed-budget selection from the same scores: XLA's two sorts against the Pallas top-k kernel.

    Records whether the two agree exactly, or the kernel's error (the kernel is on by default on CUDA
    GPUs because this comparison found them identical; see ``topk.DEFAULT_ON_GPU``)."""
    scores = jax.block_until_ready(jax.jit(lambda q, k: estimator.estimate(q, k, bcfg).scores)(q, k))
    xla = jax.jit(lambda s: select_from_scores(s, bcfg, kernel=False).indices)
    interpret = jax.devices()[0].platform != "gpu"  # CPU smoke runs: the kernel's interpret twin
    kernel = jax.jit(lambda s: select_from_scores(s, bcfg, kernel=True, interpret=interpret).indices)
    row = dict(topk_xla_ms=1e3 * tm(lambda: xla(scores)))
    try:
        row["topk_kernel_equal"] = bool(jnp.array_equal(xla(scores), kernel(scores)))
        row["topk_kernel_ms"] = 1e3 * tm(lambda: kernel(scores))
    except Exception as e:  # noqa: BLE001 - a lowering failure is a result to report, not a crash
        row["topk_kernel_error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def resolved_implementation(q, k, v, bcfg, impl: str | None) -> str:
    """The name of the implementation ``baatt.attention`` runs for these inputs."""
    return baatt.attention(q, k, v, config=bcfg, implementation=impl, return_stats=True)[1]["implementation"]


def kernel_only(q, k, v, sel, impl_name: str):
    """A jitted call of the sparse operator of ``impl_name`` on ``sel``, with its inputs prepared as
    ``baatt.attention`` prepares them (not timed): the same branch, the same layout."""
    impl = {i.name: i for i in (*BACKENDS, api.REFERENCE_IMPLEMENTATION)}[impl_name]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if api.takes_positional_path(impl, q, k, None, sel, interpret=False):
        fn = jax.jit(lambda q, k, v, i, c: impl.positional_op(q, k, v, i, c, scale=scale, block_q=sel.block_q,
                                                              block_k=sel.block_k))
        return lambda: fn(q, k, v, sel.indices, sel.counts)
    space = jax.block_until_ready(jax.jit(lambda q, k, v: layout.to_block_space(
        q, k, v, block_q=sel.block_q, block_k=sel.block_k, q_perm=sel.q_perm, k_perm=sel.k_perm))(q, k, v))
    fn = jax.jit(lambda sp, i, c: impl.sparse_op(sp, i, c, scale=scale))
    return lambda: fn(space, sel.indices, sel.counts)


def run(cfg: Config) -> list[dict]:
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=3)
    dense = harness.dense_attention(cfg.dense_impl)
    rows = []
    for L in cfg.lengths:
        q, k, v = jax.block_until_ready(harness.synthetic_inputs(L, heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16"))
        t_dense = tm(lambda: dense(q, k, v))
        for s in cfg.sparsities:
            for name, switches in VARIANTS.items():
                bcfg = baatt.BAConfig(block_size=BLOCK, sparsity=s, **switches)
                est = jax.jit(lambda q, k, c=bcfg: baatt.select_blocks(q, k, c))
                full = jax.jit(lambda q, k, v, c=bcfg: baatt.attention(q, k, v, config=c, implementation=cfg.impl))
                t_est, t_full = tm(lambda: est(q, k)), tm(lambda: full(q, k, v))
                impl_name = resolved_implementation(q, k, v, bcfg, cfg.impl)
                kern = kernel_only(q, k, v, jax.block_until_ready(est(q, k)), impl_name)
                # Kernel and pipeline timed back to back, twice, so drift of the card hits both alike.
                t_kern = min(tm(kern), tm(kern))
                t_full = min(t_full, tm(lambda: full(q, k, v)))
                row = dict(L=L, sparsity=s, variant=name, impl=impl_name, est_ms=1e3 * t_est, full_ms=1e3 * t_full,
                           kernel_ms=1e3 * t_kern, overhead_ms=1e3 * (t_full - t_kern),
                           cudnn_fwd_ms=1e3 * t_dense, est_frac_cudnn=t_est / t_dense, full_vs_cudnn=t_dense / t_full,
                           overhead_frac_cudnn=(t_full - t_kern) / t_dense)
                if cfg.parts and s == cfg.sparsities[0]:
                    row["parts_ms"] = part_times(q, k, v, bcfg, tm)
                    row["compiled_calls"] = compiled_calls(est, q, k)
                    if name == "sorted":
                        row["sort_methods"] = sort_method_times(q, k, tm)
                if name == "plain":
                    row.update(topk_times(q, k, bcfg, tm))
                rows.append(row)
                print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
    return rows


def markdown(meta, rows) -> str:
    dense = {"cudnn": "cuDNN"}.get(meta.get("dense_impl", "cudnn"), meta.get("dense_impl"))
    lines = [f"# Estimator cost ({harness.describe_run(meta)})",
             "", f"B=1, H=32, D=128, bf16, block 128, implementation {meta['impl']}. est: `select_blocks` alone; "
             f"full: `baatt.attention` end to end; both against {dense} dense forward in the same run.", "",
             "kernel: the sparse operator alone on the same selection; overhead = full - kernel (estimator, "
             "permutations and layout as compiled into the pipeline). "
             f"Norm sorts by `argsort_rows` method `{meta['row_argsort']}`.", "",
             f"| L | sparsity | variant | est ms | est / {dense} fwd | full ms | kernel ms | overhead ms "
             f"| overhead / {dense} fwd | speedup vs {dense} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['sparsity']} | {r['variant']} | {r['est_ms']:.2f} | {100 * r['est_frac_cudnn']:.2f}% "
                     f"| {r['full_ms']:.2f} | {r['kernel_ms']:.2f} | {r['overhead_ms']:.2f} "
                     f"| {100 * r['overhead_frac_cudnn']:.2f}% | {r['full_vs_cudnn']:.2f}x |")
    with_parts = [r for r in rows if "parts_ms" in r]
    if with_parts:
        names = list(with_parts[0]["parts_ms"])
        lines += ["", f"Parts (ms, sparsity {with_parts[0]['sparsity']}; prefix differences, each "
                  "compiled alone; permute: Q/K/V into sorted block space + the output's inverse):", "",
                  "| L | variant | " + " | ".join(names) + f" | {dense} fwd | sorts and custom calls after XLA |",
                  "|---|---|" + "---|" * (len(names) + 2)]
        for r in with_parts:
            lines.append(f"| {r['L']} | {r['variant']} | " + " | ".join(f"{r['parts_ms'][n]:.2f}" for n in names)
                         + f" | {r['cudnn_fwd_ms']:.1f} | {', '.join(r.get('compiled_calls', [])) or '-'} |")
    with_sorts = [r for r in rows if "sort_methods" in r]
    if with_sorts:
        methods = [k[: -len("_ms")] for k in with_sorts[0]["sort_methods"] if k.endswith("_ms")]
        lines += ["", "Norm sorts of Q and K alone by `argsort_rows` method (`baatt.selection.sorting`; segmented: "
                  "one batched sort of the [B, H, L] rows; flat: two 1-D sorts over all rows, by key then by row):", "",
                  "| L | " + " | ".join(f"{m} ms" for m in methods) + " | identical | " +
                  " | ".join(f"{m}: compiled" for m in methods) + " |", "|---|" + "---|" * (2 * len(methods) + 1)]
        for r in with_sorts:
            sm = r["sort_methods"]
            lines.append(f"| {r['L']} | " + " | ".join(f"{sm[m + '_ms']:.2f}" for m in methods) + f" | {sm['identical']} | "
                         + " | ".join(", ".join(sm[m + "_calls"]) or "-" for m in methods) + " |")
    with_topk = [r for r in rows if "topk_xla_ms" in r]
    if with_topk:
        lines += ["", "Fixed-budget selection from the same scores (plain estimator): XLA (`top_k` + sort) "
                  "against the Pallas top-k kernel (`baatt.kernels.pallas_triton.topk`):", "",
                  "| L | sparsity | XLA ms | kernel ms | identical |", "|---|---|---|---|---|"]
        for r in with_topk:
            ker = f"{r['topk_kernel_ms']:.3f}" if "topk_kernel_ms" in r else "failed: " + r.get("topk_kernel_error", "?")
            lines.append(f"| {r['L']} | {r['sparsity']} | {r['topk_xla_ms']:.3f} | {ker} | "
                         f"{r.get('topk_kernel_equal', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    if cfg.row_argsort is not None:
        sorting.ROW_ARGSORT = cfg.row_argsort
    rows = run(cfg)
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg), impl=cfg.impl or "auto",
                                dense_impl=cfg.dense_impl, row_argsort=sorting.ROW_ARGSORT)
    md = markdown(meta, rows)
    harness.write_results(cfg.out, {f"{cfg.name}.json": dict(meta=meta, rows=rows), f"{cfg.name}.md": md})
    print(md)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
