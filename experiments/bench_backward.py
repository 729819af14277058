"""PYTHONPATH=. python3 experiments/bench_backward.py --out $OUT

Backward-only speed of the block-sparse kernels against cuDNN's backward, on a GPU.

For each length L and sparsity s (B=1, H=32, D=128, bf16, block 128, bidirectional): a
random selection with the same number of kept blocks in every row (``kappa = ceil((1 - s) *
Nk)``, width kappa), and ``jax.vjp`` of the attention output taken once (forward and residuals
precomputed, outside the timing); the time is that of applying the vjp function to an output
cotangent (``jax.jit(lambda fn, do: fn(do))``), so the dense and sparse numbers compare
backward with backward. cuDNN's is the vjp of ``jax.nn.dot_product_attention(
implementation="cudnn")`` on the same [B, L, H, D] inputs, timed in the same run.

Implementations (``--impls``): ``mosaic_gpu`` (the Hopper kernels; ``--variants`` picks
``BwdTuning`` settings, see ``VARIANTS``) and ``pallas`` (the portable backward behind the
same Mosaic forward). ``--layout``: ``positional`` = ``positional_attention`` on the caller's
[B, L, H, D] arrays (what ``baatt.attention`` runs without a key mask), ``block`` =
``block_sparse_attention`` in block space ([B, H, L, D], ``all_valid``). ``--split`` also
times the dq and the dk/dv kernels alone (inputs prepared outside the timing).

frac_cudnn_bwd_thr = (density / t_ours) / (1 / t_cudnn_bwd): our throughput on the kept
blocks as a fraction of cuDNN's dense backward throughput. Writes
``bench_backward.json`` / ``.md`` under ``--out`` (device, jax version, commit from
``BAATT_COMMIT`` or git, date) and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from experiments.bench_sparse import _median_time, run_meta, write_results

VARIANTS = {  # name -> BwdTuning keyword arguments ("default" is BwdTuning())
    "default": {},
    "no_rotate": {"rotate": False},
    "pingpong": {"pingpong": True},
    "heads_fastest": {"tile_major": False},
    "stages3": {"dkv_stages": 3},
}

def random_selection(key, counts, width: int, nk: int):
    """Random distinct ascending ids per row, ``counts`` of them (all rows equal here), width ``width``."""
    import jax
    import jax.numpy as jnp

    r = jax.random.uniform(key, counts.shape + (nk,))
    order = jnp.argsort(r, axis=-1).astype(jnp.int32)
    live = jnp.arange(nk) < counts[..., None]
    kept = jnp.sort(jnp.where(live, order, nk), axis=-1)[..., :width]
    last = jnp.take_along_axis(kept, (counts - 1)[..., None], axis=-1)
    return jnp.where(jnp.arange(width) < counts[..., None], kept, last).astype(jnp.int32)


def random_inputs(length: int, heads: int, head_dim: int = 128):
    """q, k, v, dO: [1, L, H, D] bf16 standard normal (keyed by the length)."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.PRNGKey(length), 4)
    return [jax.random.normal(kk, (1, length, heads, head_dim), jnp.float32).astype(jnp.bfloat16) for kk in ks]


def equal_count_selection(length: int, sparsity: float, heads: int, block: int):
    """indices, counts, density: ``kappa = ceil((1 - s) * Nk)`` random key blocks in every row (B=1)."""
    import jax
    import jax.numpy as jnp

    nk = length // block
    kappa = max(1, math.ceil((1.0 - sparsity) * nk))
    cnt = jnp.full((1, heads, nk), kappa, jnp.int32)
    return random_selection(jax.random.PRNGKey(length + 7), cnt, kappa, nk), cnt, kappa / nk


def kernel_calls(bs, tun, layout, q, k, v, idx, cnt, do, scale, block):
    """{"dq": ..., "dkv": ...}: argument-free calls of the dq kernel alone and the dk/dv kernel alone
    (selection lists, lse and delta prepared here, outside the calls)."""
    import jax
    import jax.numpy as jnp

    from baatt.kernels.pallas_triton import block_sparse as tk

    positional = layout == "positional"
    sel = bs.pack_selection(idx, cnt)
    out, lse = jax.jit(lambda q, k, v, sel: bs.forward(q, k, v, sel, None, scale=scale, block_q=block, block_k=block,
                                                        positional=positional))(q, k, v, sel)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if positional:
        delta = jnp.swapaxes(delta, 1, 2)
    lse2 = lse * bs.LOG2E
    nk = (k.shape[1] if positional else k.shape[2]) // block
    selt = bs.pack_selection(*tk.transpose_selection(idx, cnt, nk))
    kw = {"scale": scale, "block_q": block, "block_k": block}
    dq = jax.jit(lambda *a: bs._dq_call(*a, tile_k=block, positional=positional, t=tun, **kw))
    dkv = jax.jit(lambda *a: bs._dkv_call(*a, positional=positional, t=tun, **kw))
    return {"dq": lambda: dq(q, k, v, None, sel, lse2, delta, do),
            "dkv": lambda: dkv(q, k, v, None, selt, lse2, delta, do)}


def _bwd_time(bs, impl, tun, layout, q, k, v, do, idx, cnt, *, scale, block, tm):
    """Seconds per application of the vjp function (forward and residuals computed once, outside)."""
    import jax
    import jax.numpy as jnp

    if layout == "positional":
        def f(q, k, v):
            return bs.positional_attention(q, k, v, idx, cnt, scale=scale, block_q=block, block_k=block,
                                           backward_impl=impl, backward_tuning=tun)[0]
    else:
        valid = jnp.ones(k.shape[:3], bool)

        def f(q, k, v):
            return bs.block_sparse_attention(q, k, v, valid, idx, cnt, scale=scale, block_q=block, block_k=block,
                                             all_valid=True, backward_impl=impl, backward_tuning=tun)[0]
    _, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
    apply = jax.jit(lambda fn, do: fn(do))
    return tm(lambda: apply(vjp_fn, do))


def dense_backward_call(q, k, v, do, dense_impl):
    """Argument-free call of the dense backward alone: the vjp of ``jax.nn.dot_product_attention(
    implementation=dense_impl)`` (forward and residuals computed here, once) applied to ``do``."""
    import jax

    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation=dense_impl)
    _, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
    apply = jax.jit(lambda fn, do: fn(do))
    return lambda: apply(vjp_fn, do)


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from baatt.kernels.mosaic_gpu import block_sparse as bs

    def tm(call):
        return _median_time(call, jax.block_until_ready, target_s=args.target_s, min_reps=3)

    block = 128
    scale = 1.0 / math.sqrt(128)
    rows = []
    for L in args.lengths:
        x = random_inputs(L, args.heads)
        t_cudnn = tm(dense_backward_call(*x, args.dense_impl))
        print(f"[cudnn] L={L} bwd {t_cudnn * 1e3:.2f} ms", flush=True)
        for s in args.sparsities:
            idx, cnt, density = equal_count_selection(L, s, args.heads, block)
            for impl in args.impls:
                for name in (args.variants if impl == "mosaic_gpu" else ["-"]):
                    tun = bs.BwdTuning(**VARIANTS[name]) if impl == "mosaic_gpu" else bs.DEFAULT_BWD_TUNING
                    for layout in args.layouts:
                        row = {"L": L, "s": s, "bwd": impl, "variant": name, "layout": layout, "density": density}
                        xs = x if layout == "positional" else [jnp.swapaxes(a, 1, 2) for a in x]
                        try:
                            t = _bwd_time(bs, impl, tun, layout, *xs, idx, cnt, scale=scale, block=block, tm=tm)
                            row.update(bwd_ms=t * 1e3, cudnn_bwd_ms=t_cudnn * 1e3,
                                       frac_cudnn_bwd_thr=(density / t) / (1.0 / t_cudnn))
                            if args.split and impl == "mosaic_gpu":
                                calls = kernel_calls(bs, tun, layout, *xs[:3], idx, cnt, xs[3], scale, block)
                                row.update(dq_ms=tm(calls["dq"]) * 1e3, dkv_ms=tm(calls["dkv"]) * 1e3)
                        except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                        del xs
                        rows.append(row)
                        with open(os.path.join(args.out, f"{args.name}_partial.json"), "w") as f_:
                            json.dump(rows, f_)  # what is done survives a cut-short call
                        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_)
                                          for k_, v_ in row.items()}), flush=True)
        del x
    return rows


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# bench_backward: {meta['device']}, jax {meta['jax_version']}, commit {meta['commit']}, {meta['date']}",
        "",
        meta["what"],
        "",
        "| L | sparsity | bwd | variant | layout | bwd ms | dq ms | dk/dv ms | cuDNN bwd ms | % of cuDNN bwd thr. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = r.get("frac_cudnn_bwd_thr")
        lines.append(
            f"| {r['L'] // 1024}K | {round(r['s'] * 100)}% | {r['bwd']} | {r['variant']} | {r['layout']} "
            f"| {_fmt(r.get('bwd_ms'))} | {_fmt(r.get('dq_ms'))} | {_fmt(r.get('dkv_ms'))} "
            f"| {_fmt(r.get('cudnn_bwd_ms'))} | {'-' if frac is None else f'{100 * frac:.1f}%'} |"
            + (f" error: {r['error'][:120]}" if "error" in r else ""))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--lengths", default="32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--sparsities", default="0,0.9", help="comma-separated sparsities")
    ap.add_argument("--impls", default="mosaic_gpu,pallas", help="comma-separated: mosaic_gpu, pallas")
    ap.add_argument("--variants", default="default", help=f"mosaic_gpu BwdTuning variants: {','.join(VARIANTS)}")
    ap.add_argument("--layouts", default="positional", help="comma-separated: positional, block")
    ap.add_argument("--split", action="store_true", help="also time the dq and dk/dv kernels alone")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--target-s", type=float, default=0.6, help="timing budget per measurement after warm-up")
    ap.add_argument("--dense-impl", default="cudnn", help="jax.nn.dot_product_attention implementation")
    ap.add_argument("--name", default="bench_backward", help="output file stem")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.sparsities = [float(x) for x in args.sparsities.split(",")]
    args.impls = args.impls.split(",")
    args.variants = args.variants.split(",")
    args.layouts = args.layouts.split(",")
    for name in args.variants:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    meta = run_meta(**{
        "what": (f"backward only (vjp application, residuals precomputed), B=1 H={args.heads} D=128 bf16 block 128, "
              "random selections with equal counts; cuDNN backward of jax.nn.dot_product_attention"
              f"(implementation=\"{args.dense_impl}\") timed in the same run; frac_cudnn_bwd_thr = "
              "(density / t) / (1 / t_cudnn_bwd)"),
        "variants": {n: VARIANTS[n] for n in args.variants},
    })
    write_results(args.out, args.name, meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
