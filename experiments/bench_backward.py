"""python -m experiments.bench_backward

Backward-only speed of the block-sparse kernels against cuDNN's backward, on a GPU.

For each length L and sparsity s (B=1, H=32, D=128, bf16, block 128, bidirectional; the
structured synthetic Q/K/V of ``baatt.synthetic``): a random selection with the same number
of kept blocks in every row (``kappa = ceil((1 - s) * Nk)``, width kappa), and ``jax.vjp`` of
the attention output taken once (forward and residuals precomputed, outside the timing); the
time is that of applying the vjp function to an output cotangent (``jax.jit(lambda fn, do:
fn(do))``), so the dense and sparse numbers compare backward with backward. cuDNN's is the
vjp of ``jax.nn.dot_product_attention(implementation="cudnn")`` on the same [B, L, H, D]
inputs, timed in the same run.

Implementations (``--impls``): ``mosaic_gpu`` (the Hopper kernels; ``--variants`` picks
``BwdTuning`` settings, see ``VARIANTS``) and ``pallas`` (the portable backward behind the
same Mosaic forward). ``--layouts``: ``positional`` = ``positional_attention`` on the caller's
[B, L, H, D] arrays (what ``baatt.attention`` runs without a key mask), ``block`` =
``block_sparse_attention`` in block space ([B, H, L, D], ``all_valid``). ``--split`` also
times the dq and the dk/dv kernels alone (inputs prepared outside the timing).

frac_cudnn_bwd_thr = (density / t_ours) / (1 / t_cudnn_bwd): our throughput on the kept
blocks as a fraction of cuDNN's dense backward throughput. Writes ``<name>.json`` / ``.md``
under ``--out`` (default ``experiments/results/bench_backward/``) and prints the markdown
table last. ``experiments.profile_backward`` runs the same kernels under a profiler.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from baatt.kernels import mosaic_gpu
from baatt.kernels.common import backward_row_terms, transpose_selection
from baatt.kernels.mosaic_gpu.backward_kernels import dkv_call, dq_call
from experiments import harness

VARIANTS = {  # name -> BwdTuning keyword arguments ("default" is BwdTuning())
    "default": {},
    "no_rotate": {"rotate": False},
    "pingpong": {"pingpong": True},
    "heads_fastest": {"tile_major": False},
    "stages3": {"dkv_stages": 3},
}
HEAD_DIM = 128
BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((32768, 131072), "sequence lengths")
    sparsities: tuple[float, ...] = harness.option((0.0, 0.9), "sparsities (equal counts in every row)")
    impls: tuple[str, ...] = harness.option(("mosaic_gpu", "pallas"), "backward implementations",
                                            choices=("mosaic_gpu", "pallas"))
    variants: tuple[str, ...] = harness.option(("default",), "mosaic_gpu BwdTuning variants", choices=tuple(VARIANTS))
    layouts: tuple[str, ...] = harness.option(("positional",), "input layouts", choices=("positional", "block"))
    split: bool = harness.option(False, "also time the dq and dk/dv kernels alone")
    heads: int = 32
    target_s: float = harness.option(0.6, "timing budget per measurement after warm-up (s)")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    name: str = harness.option("bench_backward", "output file stem")
    out: str = harness.option(harness.study_dir("bench_backward"), "output folder")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def inputs(length: int, heads: int):
    """q, k, v [1, L, H, 128] bf16 (``harness.synthetic_inputs``) and a standard normal output cotangent."""
    q, k, v = harness.synthetic_inputs(length, heads=heads, head_dim=HEAD_DIM, dtype="bfloat16")
    do = jax.random.normal(jax.random.PRNGKey(length + 1), q.shape, q.dtype)
    return jax.block_until_ready((q, k, v, do))


def equal_count_selection(length: int, sparsity: float, heads: int, block: int = BLOCK):
    """indices, counts, density: ``kappa = ceil((1 - s) * Nk)`` random key blocks in every row (B=1)."""
    nk = length // block
    kappa = max(1, math.ceil((1.0 - sparsity) * nk))
    cnt = jnp.full((1, heads, nk), kappa, jnp.int32)
    return harness.random_selection(jax.random.PRNGKey(length + 7), cnt, nk, kappa), cnt, kappa / nk


def kernel_calls(tuning, layout, q, k, v, idx, cnt, do, scale, block=BLOCK):
    """{"dq": ..., "dkv": ...}: argument-free calls of the Mosaic GPU dq kernel alone and dk/dv kernel
    alone (selection lists, lse and delta prepared here, outside the calls)."""
    positional = layout == "positional"
    sel = mosaic_gpu.pack_selection(idx, cnt)
    out, lse = jax.jit(lambda q, k, v, sel: mosaic_gpu.forward(q, k, v, sel, None, scale=scale, block_q=block,
                                                                block_k=block, positional=positional))(q, k, v, sel)
    do, delta, lse2 = backward_row_terms(out, lse, do, None, heads_last=positional)
    nk = (k.shape[1] if positional else k.shape[2]) // block
    selt = mosaic_gpu.pack_selection(*transpose_selection(idx, cnt, nk))
    kw = {"scale": scale, "block_q": block, "block_k": block, "positional": positional, "t": tuning}
    dq = jax.jit(lambda *a: dq_call(*a, tile_k=block, **kw))
    dkv = jax.jit(lambda *a: dkv_call(*a, **kw))
    return {"dq": lambda: dq(q, k, v, None, sel, lse2, delta, do),
            "dkv": lambda: dkv(q, k, v, None, selt, lse2, delta, do)}


def backward_time(impl, tuning, layout, q, k, v, do, idx, cnt, *, scale, tm, block=BLOCK) -> float:
    """Seconds per application of the vjp function (forward and residuals computed once, outside)."""
    if layout == "positional":
        def f(q, k, v):
            return mosaic_gpu.positional_attention(q, k, v, idx, cnt, scale=scale, block_q=block, block_k=block,
                                                   backward_impl=impl, backward_tuning=tuning)[0]
    else:
        valid = jnp.ones(k.shape[:3], bool)

        def f(q, k, v):
            return mosaic_gpu.block_sparse_attention(q, k, v, valid, idx, cnt, scale=scale, block_q=block,
                                                     block_k=block, all_valid=True, backward_impl=impl,
                                                     backward_tuning=tuning)[0]
    _, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
    apply = jax.jit(lambda fn, do: fn(do))
    return tm(lambda: apply(vjp_fn, do))


def run(cfg: Config, partial: Path) -> list[dict]:
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=3)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    rows = []
    for L in cfg.lengths:
        x = inputs(L, cfg.heads)
        t_cudnn = tm(harness.dense_backward_call(*x, cfg.dense_impl))
        print(f"[{cfg.dense_impl}] L={L} bwd {t_cudnn * 1e3:.2f} ms", flush=True)
        for s in cfg.sparsities:
            idx, cnt, density = equal_count_selection(L, s, cfg.heads)
            for impl in cfg.impls:
                mosaic = impl == "mosaic_gpu"
                for name in (cfg.variants if mosaic else ["-"]):
                    tun = mosaic_gpu.BwdTuning(**VARIANTS[name]) if mosaic else mosaic_gpu.DEFAULT_BWD_TUNING
                    for layout in cfg.layouts:
                        row = {"L": L, "s": s, "bwd": impl, "variant": name, "layout": layout, "density": density}
                        xs = x if layout == "positional" else [jnp.swapaxes(a, 1, 2) for a in x]
                        try:
                            t = backward_time(impl, tun, layout, *xs, idx, cnt, scale=scale, tm=tm)
                            row.update(bwd_ms=t * 1e3, cudnn_bwd_ms=t_cudnn * 1e3,
                                       frac_cudnn_bwd_thr=(density / t) / (1.0 / t_cudnn))
                            if cfg.split and mosaic:
                                calls = kernel_calls(tun, layout, *xs[:3], idx, cnt, xs[3], scale)
                                row.update(dq_ms=tm(calls["dq"]) * 1e3, dkv_ms=tm(calls["dkv"]) * 1e3)
                        except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                        del xs
                        rows.append(row)
                        partial.write_text(json.dumps(rows))  # what is done survives a cut-short run
                        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                                          for k_, v_ in row.items()}), flush=True)
        del x
    return rows


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# bench_backward: {harness.describe_run(meta)}",
        "",
        meta["what"],
        "",
        "| L | sparsity | bwd | variant | layout | bwd ms | dq ms | dk/dv ms | cuDNN bwd ms | % of cuDNN bwd thr. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = r.get("frac_cudnn_bwd_thr")
        lines.append(
            f"| {harness.format_length(r['L'])} | {round(r['s'] * 100)}% | {r['bwd']} | {r['variant']} | {r['layout']} "
            f"| {_fmt(r.get('bwd_ms'))} | {_fmt(r.get('dq_ms'))} | {_fmt(r.get('dkv_ms'))} "
            f"| {_fmt(r.get('cudnn_bwd_ms'))} | {'-' if frac is None else f'{100 * frac:.1f}%'} |"
            + (f" error: {r['error'][:120]}" if "error" in r else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    partial = Path(cfg.out) / f"{cfg.name}_partial.json"
    rows = run(cfg, partial)
    meta = harness.run_metadata(
        __spec__.name, argv, config=dataclasses.asdict(cfg), variants={n: VARIANTS[n] for n in cfg.variants},
        what=(f"backward only (vjp application, residuals precomputed), B=1 H={cfg.heads} D={HEAD_DIM} bf16 block "
              f"{BLOCK}, synthetic inputs, random selections with equal counts; cuDNN backward of "
              f"jax.nn.dot_product_attention(implementation=\"{cfg.dense_impl}\") timed in the same run; "
              "frac_cudnn_bwd_thr = (density / t) / (1 / t_cudnn_bwd)"))
    md = markdown(meta, rows)
    harness.write_results(cfg.out, {f"{cfg.name}.json": dict(meta=meta, rows=rows), f"{cfg.name}.md": md})
    partial.unlink(missing_ok=True)
    print(md)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
