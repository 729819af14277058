"""python -m experiments.bench_selectors
python -m experiments.bench_selectors --preset cpu_smoke

What each registered block selector's selection costs on a GPU, next to cuDNN's dense forward
measured in the same run, and how fast ``baatt.attention`` is end to end with that selector.

For each length, mask (bidirectional, then causal; ``--causal``) and sparsity, on the structured
synthetic Q/K/V of ``harness.synthetic_inputs`` (the same inputs as the other benchmarks; B=1,
H=32, D=128, bf16, block 128 by default), already on the device:

* ``cudnn_fwd_ms``: ``jax.nn.dot_product_attention(..., implementation=dense_impl)``, with
  ``is_causal=True`` in a causal run;
* per selector (``BAConfig(selector=name, sparsity=s, block_size=block)``, the selector's default
  parameters): ``select_ms``, the jitted ``baatt.select_blocks(q, k, config)`` (``is_causal`` as
  the dense side), and its share of the dense forward; ``full_ms``, the jitted
  ``baatt.attention(q, k, v, config=config)`` end to end (selection, layout, kernel), and its
  speedup over the dense forward; the share of block pairs kept (``density``, over every block
  pair: under the causal mask at most about half); the implementation that ran; and the
  estimator's FLOPs over bidirectional dense attention's ``4 L^2 d`` per query head, from the
  formula each selector's docstring states (``experiments.selector_flops``; not measured).

Every selector in ``baatt.SELECTORS`` is timed, except the exact oracles (``oracle``,
``max_oracle``), which cost a dense attention pass or more: they are listed with that note, and
timed only when ``--selectors`` names them. A selector that fails (out of memory, unsupported
inputs, a lowering error) gets its error in its row and the sweep goes on.

Per length, mask and sparsity, every selector's two programs are traced in turn and compiled
``--compile-threads`` at a time, all of them before the first timing (no compilation shares the
host with a timed call); timing is ``harness.median_time``. ``--deadline-s`` bounds a run on a
machine with a time limit: no selector starts after it, and the rest are listed as skipped.

``--preset cpu_smoke`` is a tiny CPU run (XLA dense baseline, the reference implementation) that
checks the script; its times mean nothing. Writes ``results.json`` and ``table.md`` under
``--out`` (default ``experiments/results/bench_selectors/``) and prints the table last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp

import baatt
from experiments import harness
from experiments.selector_flops import flop_fraction

# Exact oracles: a dense attention pass or more each. Listed, timed only when --selectors names them.
ORACLES = {
    "oracle": "exact oracle M_hat: a dense attention pass (two over Q K^T)",
    "max_oracle": "exact max-oracle: a dense attention pass in log space",
}


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "gpu"
    lengths: tuple[int, ...] = harness.option((32768, 131072), "sequence lengths")
    sparsities: tuple[float, ...] = harness.option((0.9,), "fixed-budget sparsities")
    causal: tuple[bool, ...] = harness.option((False, True), "masks to run: false bidirectional, true causal")
    selectors: tuple[str, ...] | None = harness.option(
        None, "selectors to time (none: every registered one but the exact oracles)")
    batch: int = 1
    heads: int = harness.option(32, "query (and key) heads")
    head_dim: int = harness.option(128, "head dimension")
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    target_s: float = harness.option(0.1, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    impl: str | None = harness.option(None, "baatt.attention implementation (none: the best available)")
    interpret: bool = harness.option(False, "Pallas interpret mode (CPU smoke runs)")
    compile_threads: int = harness.option(8, "programs compiled at once (each group's, before its timings)")
    deadline_s: float | None = harness.option(
        None, "start no selector after this many seconds from the start; the rest are listed as skipped "
              "(none: no deadline)")
    out: str = harness.option(harness.study_dir("bench_selectors"), "output folder")


PRESETS = {
    "gpu": Config(),
    "cpu_smoke": Config(preset="cpu_smoke", lengths=(512,), heads=2, head_dim=64, block=128, target_s=0.01,
                        min_reps=1, dense_impl="xla", impl="reference", compile_threads=2),
}


def get_config(preset: str = "gpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def timed_selectors(cfg: Config) -> tuple[str, ...]:
    """``--selectors``, or every registered selector but the exact oracles."""
    if cfg.selectors is not None:
        return cfg.selectors
    return tuple(name for name in baatt.SELECTORS if name not in ORACLES)


def estimator_flops(bcfg: baatt.BAConfig, cfg: Config, length: int) -> float | None:
    """The selector's FLOPs over bidirectional dense attention (its docstring's formula); None without one."""
    try:
        return flop_fraction(bcfg, length=length, q_heads=cfg.heads, kv_heads=cfg.heads)
    except ValueError:  # a selector without a formula (a user's)
        return None


def lower_selector(name: str, q, k, v, *, sparsity: float, causal: bool, cfg: Config):
    """The selection alone and ``baatt.attention`` end to end with selector ``name``, both lowered (traced
    here, to be compiled elsewhere), and the implementation the attention call runs."""
    bcfg = baatt.BAConfig(selector=name, sparsity=sparsity, block_size=cfg.block)
    attend = functools.partial(baatt.attention, config=bcfg, implementation=cfg.impl, interpret=cfg.interpret,
                               is_causal=causal)
    impl = jax.eval_shape(functools.partial(attend, return_stats=True), q, k, v)[1].implementation
    select = jax.jit(lambda q, k: baatt.select_blocks(q, k, bcfg, is_causal=causal)).lower(q, k)
    return bcfg, impl, select, jax.jit(attend).lower(q, k, v)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


def time_selector(row: dict, bcfg: baatt.BAConfig, select, full, q, k, v, *, t_dense: float, tm) -> None:
    """Adds the share of block pairs kept, and the times of the compiled selection and attention, to ``row``."""
    select, full = select.result(), full.result()
    sel = jax.block_until_ready(select(q, k))
    row["density"] = float(jnp.mean(sel.density(-(-q.shape[1] // bcfg.block_k))))
    del sel
    t_sel = tm(lambda: select(q, k))
    row.update(select_ms=1e3 * t_sel, select_frac_cudnn=t_sel / t_dense)
    t_full = tm(lambda: full(q, k, v))
    row.update(full_ms=1e3 * t_full, full_vs_cudnn=t_dense / t_full)


def measure_group(q, k, v, *, sparsity: float, causal: bool, t_dense: float, cfg: Config, pool, tm,
                  past_deadline) -> tuple[list[dict], list[str]]:
    """A row per selector at one length, mask and sparsity, and the selectors skipped at the deadline.

    Every selector's two programs are lowered here and compiled in ``pool``, all of them before the
    first timing, so that no compilation shares the host with a timed call. A failure (lowering,
    compiling or running) is recorded as the row's ``error``, with whatever was measured before it.
    Past the deadline no selector is lowered, compiled (unless under way) or timed."""
    length = q.shape[1]
    rows, programs, skipped = [], {}, []
    for name in timed_selectors(cfg):
        if past_deadline():
            skipped.append(name)
            continue
        row = dict(L=length, causal=causal, sparsity=sparsity, selector=name, cudnn_fwd_ms=1e3 * t_dense)
        rows.append(row)
        try:
            bcfg, row["impl"], select, full = lower_selector(name, q, k, v, sparsity=sparsity, causal=causal, cfg=cfg)
            row["flops_frac"] = estimator_flops(bcfg, cfg, length)
            programs[name] = (bcfg, pool.submit(select.compile), pool.submit(full.compile))
        except Exception as e:  # noqa: BLE001 - a selector that cannot run here is a result to report, not a crash
            row["error"] = _error(e)
    for _, *futures in programs.values():
        for f in futures:  # waits (an error is raised where the program is used); at the deadline, drops the rest
            if past_deadline():
                f.cancel()
            else:
                f.exception()
    timed = []
    for row in rows:
        if row["selector"] in programs:
            if past_deadline():
                skipped.append(row["selector"])
                continue
            try:
                time_selector(row, *programs.pop(row["selector"]), q, k, v, t_dense=t_dense, tm=tm)
            except Exception as e:  # noqa: BLE001 - out of memory, a compile error: reported, and the sweep goes on
                row["error"] = _error(e)
        timed.append(row)
        print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
    return timed, skipped


def measure_length(cfg: Config, length: int, pool, past_deadline) -> tuple[list[dict], list[str]]:
    """Every row at one length (its arrays are freed when it returns), and what the deadline skipped."""
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    q, k, v = jax.block_until_ready(harness.synthetic_inputs(length, batch=cfg.batch, heads=cfg.heads,
                                                             head_dim=cfg.head_dim, dtype=cfg.dtype))
    rows, skipped = [], []
    for causal in cfg.causal:
        mask = "causal" if causal else "bidirectional"
        if past_deadline():
            skipped += [f"{name} (L={length}, {mask}, sparsity {s})" for s in cfg.sparsities
                        for name in timed_selectors(cfg)]
            continue
        dense = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                          implementation=cfg.dense_impl))
        t_dense = tm(lambda: dense(q, k, v))
        print(f"[{cfg.dense_impl} {mask}] L={length} fwd {t_dense * 1e3:.2f} ms", flush=True)
        for s in cfg.sparsities:
            got, missed = measure_group(q, k, v, sparsity=s, causal=causal, t_dense=t_dense, cfg=cfg, pool=pool,
                                        tm=tm, past_deadline=past_deadline)
            rows += got
            skipped += [f"{name} (L={length}, {mask}, sparsity {s})" for name in missed]
    return rows, skipped


def _fmt(x, nd=2, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:.{nd}f}%" if pct else f"{x:.{nd}f}"


def markdown(results: dict) -> str:
    meta, cfg = results["meta"], results["meta"]["config"]
    dense = {"cudnn": "cuDNN"}.get(cfg["dense_impl"], cfg["dense_impl"])
    lines = [
        f"# bench_selectors: {harness.describe_run(meta)}",
        "",
        f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}, block {cfg['block']}, synthetic "
        f"Q/K/V. select: jitted `baatt.select_blocks` alone; full: jitted `baatt.attention` end to end; both "
        f"against {dense}'s dense forward under the same mask, in the same run (ms = median). density: block "
        "pairs kept over all block pairs. est. FLOPs: the selector's docstring formula over bidirectional "
        "dense attention (not measured). x = speedup (dense time / full time).",
        "",
        f"| L | mask | sparsity | selector | impl | density | select ms | select / {dense} fwd | est. FLOPs "
        f"| full ms | x {dense} | {dense} fwd ms | error |",
        "|" + "---|" * 13,
    ]
    for r in results["rows"]:
        lines.append(
            f"| {harness.format_length(r['L'])} | {'causal' if r['causal'] else 'bidir'} | {r['sparsity']} "
            f"| {r['selector']} | {r.get('impl', '-')} | {_fmt(r.get('density'), 3)} | {_fmt(r.get('select_ms'))} "
            f"| {_fmt(r.get('select_frac_cudnn'), pct=True)} | {_fmt(r.get('flops_frac'), 3, pct=True)} "
            f"| {_fmt(r.get('full_ms'))} | {_fmt(r.get('full_vs_cudnn'))} | {_fmt(r['cudnn_fwd_ms'])} "
            f"| {r.get('error', '').replace('|', '/').replace(chr(10), ' ')[:120]} |")
    if results["skipped_at_deadline"]:
        lines += ["", f"Skipped at the deadline ({cfg['deadline_s']} s): "
                  + ", ".join(results["skipped_at_deadline"]) + "."]
    if results["not_timed"]:
        lines += ["", "Not timed (name them in `--selectors` to time them): "
                  + "; ".join(f"`{n}`, {note}" for n, note in results["not_timed"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    t0 = time.time()
    past_deadline = lambda: cfg.deadline_s is not None and time.time() - t0 > cfg.deadline_s
    rows, skipped = [], []
    with ThreadPoolExecutor(max(1, cfg.compile_threads)) as pool:
        for length in cfg.lengths:
            got, missed = measure_length(cfg, length, pool, past_deadline)
            rows += got
            skipped += missed
    names = timed_selectors(cfg)
    not_timed = {n: note for n, note in ORACLES.items() if n in baatt.SELECTORS and n not in names}
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg), selectors=list(names),
                                seconds=round(time.time() - t0, 1))
    results = dict(meta=meta, rows=rows, not_timed=not_timed, skipped_at_deadline=skipped)
    harness.report_study(cfg.out, results, markdown(results))
    return results


if __name__ == "__main__":
    main()
