"""python -m experiments.bench_causal

Causal block-sparse attention speed on a GPU against the dense causal kernels, all measured in
the same run: cuDNN (``jax.nn.dot_product_attention(..., is_causal=True,
implementation=dense_impl)``) and FlashAttention-2 (torch SDPA, flash backend,
``is_causal=True``).

Grid (``get_config``): L in {32K, 128K}, B=1, H=32, D=128, bf16, block 128, token-causal mask
(``--preset smoke``: a tiny CPU run in interpret mode that checks the script; its times mean
nothing). For each length:

* ``kernel_fwd`` / ``kernel_fwdbwd``: the block-sparse kernel of ``--impl`` alone at 0%
  sparsity, i.e. on the causal selection that keeps every block the mask allows (the diagonal
  blocks masked inside their tiles), in block space; fwd+bwd is ``vjp`` with a given cotangent.
  Its throughput is the kernel-versus-kernel comparison with cuDNN and FA2.
* ``full_fwd`` / ``full_fwdbwd``: ``baatt.attention(..., is_causal=True)`` end to end at
  ``--sparsity`` (default 90%: estimator, selection, layout changes, kernel, scatter back;
  fwd+bwd differentiates the whole call).
* ``cudnn_*`` and ``fa2_*``: the dense causal kernels (FA2 in a torch child process, first, so
  that the two frameworks never share the GPU memory pool).

TFLOP/s count only the valid half of the work, for every kernel alike: a causal forward does
``4 * D * L * (L + 1) / 2`` FLOPs per (batch, head), forward+backward 3.5x that (backward = 2.5x
forward). Writes ``bench_causal.json`` / ``.md`` (and ``_fa2.json``) under ``--out`` (default
``experiments/results/bench_causal/``) and prints the markdown table last.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

import baatt
from baatt import kernels, layout
from experiments import harness

IMPLEMENTATIONS = ("mosaic_gpu", "pallas")  # the backends with causal kernels


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((32768, 131072), "sequence lengths")
    sparsity: float = harness.option(0.9, "fixed-budget sparsity of the end-to-end measurement")
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    target_s: float = harness.option(0.6, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    impl: str = harness.option("mosaic_gpu", "block-sparse implementation timed", choices=IMPLEMENTATIONS)
    interpret: bool = harness.option(False, "Pallas interpret mode (CPU smoke runs)")
    torch: bool = harness.option(True, "time FlashAttention-2 through torch")
    out: str = harness.option(harness.study_dir("bench_causal"), "output folder")


PRESETS = {
    "full": Config(),
    "smoke": Config(lengths=(256,), heads=2, head_dim=64, block=64, target_s=0.01, min_reps=1, dense_impl="xla",
                    interpret=True, torch=False, impl="pallas"),
}


def get_config(preset: str = "full", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def causal_forward_flops(cfg: Config, length: int) -> float:
    """FLOPs of the valid (lower-triangular) half of a causal forward: 4 * D per allowed (query, key) pair."""
    return 4.0 * cfg.batch * cfg.heads * cfg.head_dim * length * (length + 1) / 2


def dense_causal(implementation: str):
    """Jitted causal ``jax.nn.dot_product_attention``, and its forward+backward on a cotangent."""
    forward = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=implementation)

    @jax.jit
    def fwdbwd(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(do)

    return jax.jit(forward), fwdbwd


def run_grid(cfg: Config, fa2: dict) -> list[dict]:
    """One row per length; ``fa2``: {str(L): {"fwd_ms", "fwdbwd_ms"}} measured beforehand (causal)."""
    rows = []
    for length in cfg.lengths:
        rows.append(measure_length(cfg, length, fa2.get(str(length), {})))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
    return rows


def measure_length(cfg: Config, length: int, fa2: dict) -> dict:
    """Every measurement at one length (its arrays are freed when it returns); ``fa2``: that length's FA2 times."""
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    bs = cfg.block
    scale = 1.0 / math.sqrt(cfg.head_dim)
    q, k, v = jax.block_until_ready(harness.synthetic_inputs(length, batch=cfg.batch, heads=cfg.heads,
                                                             head_dim=cfg.head_dim, dtype=cfg.dtype))
    do = jax.block_until_ready(jax.random.normal(jax.random.PRNGKey(length + 1), q.shape, q.dtype))
    flops = causal_forward_flops(cfg, length)
    dense_fwd, dense_fwdbwd = dense_causal(cfg.dense_impl)
    t_cudnn = tm(lambda: dense_fwd(q, k, v))
    t_cudnn_fb = tm(lambda: dense_fwdbwd(q, k, v, do))
    print(f"[{cfg.dense_impl} causal] L={length} fwd {t_cudnn * 1e3:.2f} ms fwd+bwd {t_cudnn_fb * 1e3:.2f} ms",
          flush=True)

    # The kernel alone at 0% sparsity: every block the causal mask allows, in block space.
    every_block = baatt.BAConfig(block_size=bs, mask="causal")
    sel = jax.block_until_ready(baatt.select_blocks(q, k, every_block))
    space = layout.to_block_space(q, k, v, block_q=bs, block_k=bs, mask=sel.mask)

    sparse_op = {impl.name: impl for impl in kernels.BACKENDS}[cfg.impl].sparse_op

    def kernel(q, k, v):
        return sparse_op(dataclasses.replace(space, q=q, k=k, v=v), sel.indices, sel.counts, scale=scale,
                         interpret=cfg.interpret)

    kernel_fwd = jax.jit(kernel)
    kernel_fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(lambda *x: kernel(*x)[0], q, k, v)[1](do))
    do_b = jnp.swapaxes(do, 1, 2)
    t_k = tm(lambda: kernel_fwd(space.q, space.k, space.v))
    t_kfb = tm(lambda: kernel_fwdbwd(space.q, space.k, space.v, do_b))

    # End to end at the configured sparsity: estimator, selection, layout changes, kernel.
    sparse = every_block.replace(sparsity=cfg.sparsity)
    attend = lambda q, k, v: baatt.attention(q, k, v, config=sparse, implementation=cfg.impl, interpret=cfg.interpret)
    full_fwd = jax.jit(attend)
    full_fwdbwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    t_full = tm(lambda: full_fwd(q, k, v))
    t_full_fb = tm(lambda: full_fwdbwd(q, k, v, do))
    _, stats = baatt.attention(q, k, v, config=sparse, implementation=cfg.impl, interpret=cfg.interpret,
                               return_stats=True)

    row = dict(
        L=length, sparsity=cfg.sparsity, full_density=float(jnp.mean(stats["density"])),
        kernel_fwd_ms=t_k * 1e3, kernel_fwdbwd_ms=t_kfb * 1e3,
        kernel_fwd_tflops=flops / t_k / 1e12, kernel_fwdbwd_tflops=3.5 * flops / t_kfb / 1e12,
        full_fwd_ms=t_full * 1e3, full_fwdbwd_ms=t_full_fb * 1e3,
        cudnn_fwd_ms=t_cudnn * 1e3, cudnn_fwdbwd_ms=t_cudnn_fb * 1e3,
        cudnn_fwd_tflops=flops / t_cudnn / 1e12, cudnn_fwdbwd_tflops=3.5 * flops / t_cudnn_fb / 1e12,
        fa2_fwd_ms=fa2.get("fwd_ms"), fa2_fwdbwd_ms=fa2.get("fwdbwd_ms"),
        full_vs_cudnn_fwd=t_cudnn / t_full, full_vs_cudnn_fwdbwd=t_cudnn_fb / t_full_fb,
    )
    if fa2:
        row.update(
            fa2_fwd_tflops=flops / (fa2["fwd_ms"] / 1e3) / 1e12,
            fa2_fwdbwd_tflops=3.5 * flops / (fa2["fwdbwd_ms"] / 1e3) / 1e12,
            full_vs_fa2_fwd=fa2["fwd_ms"] / row["full_fwd_ms"],
            full_vs_fa2_fwdbwd=fa2["fwdbwd_ms"] / row["full_fwdbwd_ms"],
        )
    return row


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    cfg = meta["config"]
    lines = [
        f"# bench_causal ({cfg['impl']}): {harness.describe_run(meta)}, torch {meta.get('torch', '-')}",
        "",
        f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}, causal, block {cfg['block']}. "
        "ms = median. TFLOP/s count the valid (lower-triangular) half only, for every kernel "
        "(fwd+bwd = 3.5x fwd). Kernel: every allowed block (0% sparsity). "
        f"End to end: baatt.attention(is_causal=True) at {int(round(100 * cfg['sparsity']))}% sparsity. "
        "x = speedup (baseline time / ours).",
        "",
        "### Kernel throughput at 0% sparsity",
        "",
        "| L | kernel fwd ms | TFLOP/s | cuDNN fwd ms | TFLOP/s | FA2 fwd ms | TFLOP/s "
        "| kernel fwd+bwd ms | TFLOP/s | cuDNN fwd+bwd ms | TFLOP/s | FA2 fwd+bwd ms | TFLOP/s |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {harness.format_length(r['L'])} | {_fmt(r['kernel_fwd_ms'])} | {_fmt(r['kernel_fwd_tflops'], 0)} "
            f"| {_fmt(r['cudnn_fwd_ms'])} | {_fmt(r['cudnn_fwd_tflops'], 0)} | {_fmt(r.get('fa2_fwd_ms'))} "
            f"| {_fmt(r.get('fa2_fwd_tflops'), 0)} | {_fmt(r['kernel_fwdbwd_ms'])} "
            f"| {_fmt(r['kernel_fwdbwd_tflops'], 0)} | {_fmt(r['cudnn_fwdbwd_ms'])} "
            f"| {_fmt(r['cudnn_fwdbwd_tflops'], 0)} | {_fmt(r.get('fa2_fwdbwd_ms'))} "
            f"| {_fmt(r.get('fa2_fwdbwd_tflops'), 0)} |")
    lines += [
        "",
        f"### End to end at {int(round(100 * cfg['sparsity']))}% sparsity",
        "",
        "| L | density | full fwd ms | x cuDNN | x FA2 | full fwd+bwd ms | x cuDNN | x FA2 |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {harness.format_length(r['L'])} | {_fmt(r['full_density'], 3)} | {_fmt(r['full_fwd_ms'])} "
            f"| {_fmt(r['full_vs_cudnn_fwd'])} | {_fmt(r.get('full_vs_fa2_fwd'))} | {_fmt(r['full_fwdbwd_ms'])} "
            f"| {_fmt(r['full_vs_cudnn_fwdbwd'])} | {_fmt(r.get('full_vs_fa2_fwdbwd'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    fa2 = None
    if cfg.torch:  # first: the torch child must have the GPU to itself
        fa2 = harness.flash_attention2_times(cfg.lengths, batch=cfg.batch, heads=cfg.heads, head_dim=cfg.head_dim,
                                             dtype=cfg.dtype, target_s=cfg.target_s, min_reps=cfg.min_reps,
                                             causal=True)
    rows = run_grid(cfg, fa2["fa2"] if fa2 else {})
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg),
                                **({"torch": fa2["torch"]} if fa2 else {}))
    md = markdown(meta, rows)
    files = {"bench_causal.json": dict(meta=meta, rows=rows), "bench_causal.md": md}
    if fa2:
        files["bench_causal_fa2.json"] = dict(meta, **fa2)
    harness.write_results(Path(cfg.out), files)
    print(md)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
