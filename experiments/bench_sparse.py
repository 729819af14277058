"""python -m experiments.bench_sparse

Block-sparse attention forward (and forward+backward) speed on a GPU: the kernel of
``--impl`` (``pallas``: the portable Pallas (Triton) kernel; ``mosaic_gpu``: the Hopper kernel,
e.g. ``python -m experiments.bench_sparse --impl mosaic_gpu --lengths 32768,131072
--sparsities 0,0.5,0.9``) against cuDNN (``jax.nn.dot_product_attention(
implementation=dense_impl)``) and FlashAttention-2 (torch SDPA, flash backend), all measured
in the same run.

Grid (``get_config``): L in {8K, 16K, 32K, 64K, 128K}, sparsity in {0, 50, 70, 90, 95}%,
B=1, H=32, D=128, bf16, bidirectional, block 128 (``--preset quick``: 8K and 32K at 0 and
90%; ``--preset smoke``: a tiny CPU run in interpret mode that checks the script, times mean
nothing). For each point:

* ``ba``: the BA-Att selection (``BAConfig(sparsity=s)``, default switches) on the
  structured synthetic Q/K/V of ``baatt.synthetic`` (``harness.synthetic_inputs``);
* ``random``: a random selection with the same number of blocks per row.

Times (``harness.median_time``: median of repeated runs after a warm-up, inputs on device):

* ``kernel_fwd`` / ``kernel_fwdbwd``: the sparse kernel alone on a precomputed selection
  (portable kernel: in block space; Mosaic GPU: on the caller's [B, L, H, D] arrays, the
  path ``baatt.attention`` takes without sorting); fwd+bwd is ``vjp`` with a given cotangent;
* ``est``: the BA-Att estimator alone (``baatt.select_blocks``);
* ``full_fwd``: ``baatt.attention(..., implementation=impl)`` end to end (estimation,
  layout changes, kernel, scatter back);
* ``cudnn_*`` and ``fa2_*``: the dense kernels (FA2 in a torch child process, first, so
  that the two frameworks never share the GPU memory pool).

TFLOP/s count only computed blocks: forward 4*bq*bk*D per selected block pair,
forward+backward 3.5x that (backward = 2.5x forward), dense likewise with every pair.
Writes ``bench_sparse[_mosaic_gpu].json`` / ``.md`` (and ``_fa2.json``) under ``--out``
(default ``experiments/results/bench_sparse/``) and prints the markdown table last.
``--tune`` times kernel variants instead (``--preset tune``: 32K and 128K at 0/50/90%):
``MOSAIC_FWD_VARIANTS`` for ``mosaic_gpu``, ``PALLAS_VARIANTS`` for ``pallas``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

import baatt
from baatt import layout
from baatt.kernels import mosaic_gpu, pallas_triton
from experiments import harness

IMPLEMENTATIONS = ("pallas", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((8192, 16384, 32768, 65536, 131072), "sequence lengths")
    sparsities: tuple[float, ...] = harness.option((0.0, 0.5, 0.7, 0.9, 0.95), "fixed-budget sparsities")
    # Optional trims to fit a time-limited run: from ``long_from`` tokens on, only ``long_sparsities``
    # and fwd+bwd only at ``fwdbwd_sparsities_long`` (off by default: the full grid took ~5 min on an H200).
    long_sparsities: tuple[float, ...] = harness.option((0.0, 0.5, 0.9, 0.95), "sparsities from long_from tokens on")
    long_from: int = harness.option(1 << 30, "length from which long_sparsities apply")
    fwdbwd_sparsities_long: tuple[float, ...] = harness.option(
        (0.0, 0.9), "sparsities timed forward+backward from long_from tokens on")
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    target_s: float = harness.option(0.6, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    impl: str = harness.option("pallas", "block-sparse implementation timed", choices=IMPLEMENTATIONS)
    interpret: bool = harness.option(False, "Pallas interpret mode (CPU smoke runs)")
    tune: bool = harness.option(False, "time kernel variants instead of the grid")
    torch: bool = harness.option(True, "time FlashAttention-2 through torch")
    out: str = harness.option(harness.study_dir("bench_sparse"), "output folder")


PRESETS = {
    "full": Config(),
    "quick": Config(lengths=(8192, 32768), sparsities=(0.0, 0.9)),
    "tune": Config(tune=True, lengths=(32768, 131072), sparsities=(0.0, 0.5, 0.9)),
    "smoke": Config(lengths=(512,), sparsities=(0.0, 0.5), heads=2, head_dim=64, block=64, target_s=0.01, min_reps=1,
                    dense_impl="xla", interpret=True, torch=False),
}


def get_config(preset: str = "full", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def pad_indices(indices, counts, nk: int):
    """[.., kmax] -> [.., nk]: one static width per length, so the kernel compiles once per L."""
    kmax = indices.shape[-1]
    if kmax == nk:
        return indices
    last = jnp.take_along_axis(indices, (counts - 1)[..., None], axis=-1)
    return jnp.concatenate([indices, jnp.broadcast_to(last, indices.shape[:-1] + (nk - kmax,))], axis=-1)


def inputs(cfg: Config, length: int):
    """q, k, v [B, L, H, D] of the benchmark (``harness.synthetic_inputs``), on device."""
    return jax.block_until_ready(harness.synthetic_inputs(length, batch=cfg.batch, heads=cfg.heads,
                                                          head_dim=cfg.head_dim, dtype=cfg.dtype))


def run_grid(cfg: Config, fa2: dict, partial_path: Path | None = None) -> list[dict]:
    """One row per (L, sparsity, selection); ``fa2``: {str(L): {"fwd_ms", "fwdbwd_ms"}} measured beforehand."""
    mosaic = cfg.impl == "mosaic_gpu"
    rows = []
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    d, bs = cfg.head_dim, cfg.block
    scale = 1.0 / math.sqrt(d)
    dense_fwd = harness.dense_attention(cfg.dense_impl)
    dense_fwdbwd = harness.dense_attention_fwdbwd(cfg.dense_impl)
    for L in cfg.lengths:
        q, k, v = inputs(cfg, L)
        do = jax.block_until_ready(jax.random.normal(jax.random.PRNGKey(L + 1), q.shape, q.dtype))
        dense_fwd_flops = 4.0 * cfg.batch * cfg.heads * L * L * d
        t_cudnn = tm(lambda: dense_fwd(q, k, v))
        t_cudnn_fb = tm(lambda: dense_fwdbwd(q, k, v, do))
        print(f"[{cfg.dense_impl}] L={L} fwd {t_cudnn*1e3:.2f} ms fwd+bwd {t_cudnn_fb*1e3:.2f} ms", flush=True)

        space = layout.to_block_space(q, k, v, block_q=bs, block_k=bs)
        nk = space.num_k_blocks
        do_b = jnp.swapaxes(do, 1, 2)

        def sparse_op(q, k, v, valid, idx, cnt):
            if mosaic:  # the caller's [B, L, H, D] layout (the path baatt.attention takes without sort/mask)
                return mosaic_gpu.positional_attention(q, k, v, idx, cnt, scale=scale, block_q=bs, block_k=bs)
            return pallas_triton.block_sparse_attention(q, k, v, valid, idx, cnt, scale=scale, block_q=bs,
                                                        block_k=bs, interpret=cfg.interpret)

        kern = jax.jit(sparse_op)

        @jax.jit
        def kern_fb(q, k, v, valid, idx, cnt, do):
            out, vjp = jax.vjp(lambda q, k, v: sparse_op(q, k, v, valid, idx, cnt)[0], q, k, v)
            return out, vjp(do)

        sparsities = cfg.long_sparsities if L >= cfg.long_from else cfg.sparsities
        for s in sparsities:
            bcfg = baatt.BAConfig(block_size=bs, sparsity=s)
            est_fn = jax.jit(lambda q, k: baatt.select_blocks(q, k, bcfg))
            t_est = tm(lambda: est_fn(q, k))
            sel = est_fn(q, k)
            full_fn = jax.jit(lambda q, k, v: baatt.attention(q, k, v, config=bcfg, implementation=cfg.impl,
                                                              interpret=cfg.interpret))
            t_full = tm(lambda: full_fn(q, k, v))
            # Mosaic GPU: the selection's own width, as baatt.attention passes it (the forward picks its
            # persistent or one-CTA-per-tile variant from it); the portable kernel: width Nk, one compile per L.
            width = sel.indices.shape[-1] if mosaic else nk
            sel_ba = pad_indices(sel.indices, sel.counts, nk)[..., :width]
            sel_rand = harness.random_selection(jax.random.PRNGKey(L + 7), sel.counts, nk, width)
            for name, idx in (("ba", sel_ba), ("random", sel_rand)):
                args = ((q, k, v) if mosaic else (space.q, space.k, space.v)) + (space.kv_valid, idx, sel.counts)
                t_k = tm(lambda: kern(*args))
                do_fb = L < cfg.long_from or s in cfg.fwdbwd_sparsities_long
                t_kfb = tm(lambda: kern_fb(*args, do if mosaic else do_b)) if do_fb else float("nan")
                pairs = float(jnp.sum(sel.counts))
                fwd_flops = 4.0 * bs * bs * d * pairs
                f2 = fa2.get(str(L), {})
                row = dict(
                    L=L, sparsity=s, selection=name, density=pairs / (cfg.batch * cfg.heads * nk * nk),
                    kernel_fwd_ms=t_k * 1e3, kernel_fwd_tflops=fwd_flops / t_k / 1e12,
                    kernel_fwdbwd_ms=t_kfb * 1e3, kernel_fwdbwd_tflops=3.5 * fwd_flops / t_kfb / 1e12,
                    est_ms=t_est * 1e3 if name == "ba" else None,
                    full_fwd_ms=t_full * 1e3 if name == "ba" else None,
                    cudnn_fwd_ms=t_cudnn * 1e3, cudnn_fwdbwd_ms=t_cudnn_fb * 1e3,
                    cudnn_fwd_tflops=dense_fwd_flops / t_cudnn / 1e12,
                    cudnn_fwdbwd_tflops=3.5 * dense_fwd_flops / t_cudnn_fb / 1e12,
                    fa2_fwd_ms=f2.get("fwd_ms"), fa2_fwdbwd_ms=f2.get("fwdbwd_ms"),
                )
                row["kernel_vs_cudnn_fwd"] = t_cudnn / t_k
                row["kernel_vs_cudnn_fwdbwd"] = t_cudnn_fb / t_kfb
                row["kernel_frac_cudnn_throughput"] = row["kernel_fwd_tflops"] / row["cudnn_fwd_tflops"]
                if f2:
                    row["kernel_vs_fa2_fwd"] = f2["fwd_ms"] / row["kernel_fwd_ms"]
                    row["kernel_vs_fa2_fwdbwd"] = f2["fwdbwd_ms"] / row["kernel_fwdbwd_ms"]
                if name == "ba":
                    row["full_vs_cudnn_fwd"] = t_cudnn / t_full
                    if f2:
                        row["full_vs_fa2_fwd"] = f2["fwd_ms"] / row["full_fwd_ms"]
                rows.append(row)
                print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}),
                      flush=True)
            sel = sel_ba = sel_rand = None  # frees device memory before the next size
        q = k = v = do = do_b = space = None  # frees device memory before the next size
        if partial_path:  # keep what is done if the run is cut short (removed once the run completes)
            partial_path.write_text(json.dumps(rows))
    return rows


PALLAS_VARIANTS = {  # name -> pallas_triton.Tuning keyword arguments (forward variants; "default" also fwd+bwd)
    "default": {},
    "no_rotate": dict(fwd_rotate=False),
    "fwd_stages3": dict(fwd_stages=3),
}


def run_tune_pallas(cfg: Config) -> list[dict]:
    """``PALLAS_VARIANTS`` on random selections with equal counts, against the dense forward in the same run."""
    rows = []
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=3)
    bs, d = cfg.block, cfg.head_dim
    dense_fwd = harness.dense_attention(cfg.dense_impl)
    for L in cfg.lengths:
        q, k, v = inputs(cfg, L)
        t = tm(lambda: dense_fwd(q, k, v))
        row = dict(L=L, variant="cudnn_dense", fwd_ms=t * 1e3, fwd_tflops=4.0 * L * L * d * cfg.heads / t / 1e12)
        print(json.dumps(row), flush=True)
        rows.append(row)
        space = layout.to_block_space(q, k, v, block_q=bs, block_k=bs)
        nk = space.num_k_blocks
        do_b = jnp.swapaxes(jax.random.normal(jax.random.PRNGKey(1), q.shape, q.dtype), 1, 2)
        for s in cfg.sparsities:
            kappa = max(1, math.ceil((1 - s) * nk))
            counts = jnp.full((cfg.batch, cfg.heads, nk), kappa, jnp.int32)
            idx = harness.random_selection(jax.random.PRNGKey(3), counts, nk)
            flops = 4.0 * bs * bs * d * float(jnp.sum(counts))
            args = (space.q, space.k, space.v, space.kv_valid, idx, counts)
            for name, kw in PALLAS_VARIANTS.items():
                tun = pallas_triton.Tuning(**kw)
                row = dict(L=L, sparsity=s, variant=name)
                try:
                    f = jax.jit(lambda *a, t=tun: pallas_triton.block_sparse_attention(
                        *a, scale=d ** -0.5, block_q=bs, block_k=bs, tuning=t, interpret=cfg.interpret))
                    t = tm(lambda: f(*args))
                    row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12)
                    if name == "default":
                        @jax.jit
                        def fb(q, k, v, valid, idx, cnt, do, t=tun):
                            g = lambda q, k, v: pallas_triton.block_sparse_attention(
                                q, k, v, valid, idx, cnt, scale=d ** -0.5, block_q=bs, block_k=bs, tuning=t,
                                interpret=cfg.interpret)[0]
                            out, vjp = jax.vjp(g, q, k, v)
                            return out, vjp(do)
                        t = tm(lambda: fb(*args, do_b))
                        row.update(fwdbwd_ms=t * 1e3, fwdbwd_tflops=3.5 * flops / t / 1e12)
                except Exception as e:  # noqa: BLE001 - a variant that fails is a result to report
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


MOSAIC_FWD_VARIANTS = {  # name -> mosaic_gpu.Tuning keyword arguments (the first is the reference output)
    "one_per_tile": dict(persistent=False),  # explicit: the default Tuning picks by walk length
    "persistent": dict(persistent=True),
    "persistent_heads_fastest": dict(persistent=True, tile_major=False),
}


def run_tune_mosaic(cfg: Config) -> list[dict]:
    """Mosaic GPU forward variants (``MOSAIC_FWD_VARIANTS``) on BA-Att selections, in the caller's layout
    (the path ``baatt.attention`` takes without sorting), against the dense forward in the same run;
    each variant's output is compared with the first variant's."""
    rows = []
    sync = jax.block_until_ready
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=5)
    bs, d = cfg.block, cfg.head_dim
    dense_fwd = harness.dense_attention(cfg.dense_impl)
    for L in cfg.lengths:
        q, k, v = inputs(cfg, L)
        t_dense = tm(lambda: dense_fwd(q, k, v))
        dense_tflops = 4.0 * L * L * d * cfg.heads * cfg.batch / t_dense / 1e12
        print(json.dumps(dict(L=L, variant="cudnn_dense", fwd_ms=t_dense * 1e3, fwd_tflops=dense_tflops)), flush=True)
        for s in cfg.sparsities:
            sel = sync(jax.jit(lambda q, k: baatt.select_blocks(q, k, baatt.BAConfig(block_size=bs, sparsity=s)))(q, k))
            flops = 4.0 * bs * bs * d * float(jnp.sum(sel.counts))
            ref_out = None
            for name, kw in MOSAIC_FWD_VARIANTS.items():
                tun = mosaic_gpu.Tuning(**kw)
                f = jax.jit(lambda q, k, v, i, c, t=tun: mosaic_gpu.positional_attention(
                    q, k, v, i, c, scale=d ** -0.5, block_q=bs, block_k=bs, tuning=t))
                row = dict(L=L, sparsity=s, variant=name, cudnn_fwd_ms=t_dense * 1e3)
                try:
                    out = sync(f(q, k, v, sel.indices, sel.counts))[0]
                    ref_out = out if ref_out is None else ref_out
                    row["max_abs_diff_vs_first"] = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                                                           - ref_out.astype(jnp.float32))))
                    t = tm(lambda: f(q, k, v, sel.indices, sel.counts))
                    row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12,
                               frac_cudnn_throughput=flops / t / 1e12 / dense_tflops)
                except Exception as e:  # noqa: BLE001 - a variant that fails is a result to report
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
        q = k = v = None  # frees device memory before the next size
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def tune_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Mosaic GPU forward variants ({harness.describe_run(meta)})", "",
             "B=1 H=32 D=128 bf16, block 128, BA-Att selections, caller's layout; throughput "
             "over computed blocks against cuDNN's dense forward in the same run.", "",
             "| L | sparsity | variant | fwd ms | TFLOP/s | % cuDNN thr. "
             f"| max abs diff vs {next(iter(MOSAIC_FWD_VARIANTS))} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "sparsity" not in r:
            continue
        if "error" in r:
            lines.append(f"| {harness.format_length(r['L'])} | {r['sparsity']} | {r['variant']} "
                         f"| failed: {r['error'][:120]} | | | |")
            continue
        lines.append(f"| {harness.format_length(r['L'])} | {int(round(100 * r['sparsity']))}% | {r['variant']} "
                     f"| {r['fwd_ms']:.2f} "
                     f"| {r['fwd_tflops']:.0f} | {100 * r['frac_cudnn_throughput']:.1f}% "
                     f"| {r['max_abs_diff_vs_first']:.2e} |")
    return "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list[dict]) -> str:
    cfg = meta["config"]
    lines = [
        f"# bench_sparse ({cfg['impl']}): {harness.describe_run(meta)}, torch {meta.get('torch', '-')}",
        "",
        f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']} bidirectional, block {cfg['block']}. "
        "ms = median. TFLOP/s count computed blocks only (fwd+bwd = 3.5x fwd). x = speedup (baseline time / ours).",
        "",
        "| L | sparsity | sel | kernel fwd ms | TFLOP/s | % cuDNN thr. | est ms | full fwd ms | cuDNN fwd ms "
        "| FA2 fwd ms | kernel x cuDNN | full x cuDNN | full x FA2 | kernel fwd+bwd ms | cuDNN fwd+bwd ms "
        "| FA2 fwd+bwd ms | fwd+bwd x cuDNN | fwd+bwd x FA2 |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        lines.append(
            f"| {harness.format_length(r['L'])} | {int(round(r['sparsity'] * 100))}% | {r['selection']} "
            f"| {_fmt(r['kernel_fwd_ms'])} "
            f"| {_fmt(r['kernel_fwd_tflops'], 0)} | {_fmt(100 * r['kernel_frac_cudnn_throughput'], 0)}% "
            f"| {_fmt(r.get('est_ms'))} | {_fmt(r.get('full_fwd_ms'))} | {_fmt(r['cudnn_fwd_ms'])} "
            f"| {_fmt(r.get('fa2_fwd_ms'))} | {_fmt(r['kernel_vs_cudnn_fwd'])} | {_fmt(r.get('full_vs_cudnn_fwd'))} "
            f"| {_fmt(r.get('full_vs_fa2_fwd'))} | {_fmt(r['kernel_fwdbwd_ms'])} | {_fmt(r['cudnn_fwdbwd_ms'])} "
            f"| {_fmt(r.get('fa2_fwdbwd_ms'))} | {_fmt(r['kernel_vs_cudnn_fwdbwd'])} "
            f"| {_fmt(r.get('kernel_vs_fa2_fwdbwd'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tune:
        rows = run_tune_mosaic(cfg) if cfg.impl == "mosaic_gpu" else run_tune_pallas(cfg)
        meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg))
        stem = "bench_sparse_mosaic_gpu_fwd_tune" if cfg.impl == "mosaic_gpu" else "bench_sparse_tune"
        files = {f"{stem}.json": dict(meta=meta, rows=rows)}
        if cfg.impl == "mosaic_gpu":
            files[f"{stem}.md"] = tune_markdown(meta, rows)
            print(files[f"{stem}.md"])
        harness.write_results(out, files)
        return dict(meta=meta, rows=rows)
    stem = "bench_sparse" if cfg.impl == "pallas" else f"bench_sparse_{cfg.impl}"
    fa2 = None
    if cfg.torch:  # first: the torch child must have the GPU to itself
        fa2 = harness.flash_attention2_times(cfg.lengths, batch=cfg.batch, heads=cfg.heads, head_dim=cfg.head_dim,
                                             dtype=cfg.dtype, target_s=cfg.target_s, min_reps=cfg.min_reps)
    partial = out / f"{stem}_partial.json"
    rows = run_grid(cfg, fa2["fa2"] if fa2 else {}, partial_path=partial)
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg),
                                **({"torch": fa2["torch"]} if fa2 else {}))
    md = markdown(meta, rows)
    files = {f"{stem}.json": dict(meta=meta, rows=rows), f"{stem}.md": md}
    if fa2:
        files[f"{stem}_fa2.json"] = dict(meta, **fa2)
    harness.write_results(out, files)
    partial.unlink(missing_ok=True)
    print(md)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
