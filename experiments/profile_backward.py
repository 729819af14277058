"""Run the Mosaic GPU backward kernels a few times, for a hardware-counter profiler on a GPU.

    ncu --clock-control none --kernel-name regex:'baatt_block_sparse_d|sdpa|flash' --launch-count 6 \\
        --section SpeedOfLight --section WarpStateStats -o bwd \\
        env PYTHONPATH=. python3 experiments/profile_backward.py --length 32768 --sparsity 0.9

The same inputs as ``bench_backward`` (B=1, H=32, D=128, bf16, block 128, random selection of
``ceil((1 - s) * Nk)`` blocks per row): the dq kernel and the dk/dv kernel alone (``--variant``
picks the ``BwdTuning``), then cuDNN's backward on the same
arrays, each ``--reps`` times after one compile. Nothing is timed here: the profiler does it.
"""

from __future__ import annotations

import argparse
import math

from experiments.bench_backward import VARIANTS, random_selection


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--variant", default="default", help=f"BwdTuning variant: {','.join(VARIANTS)}")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-cudnn", action="store_true", help="skip cuDNN's backward")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from baatt.kernels.mosaic_gpu import block_sparse as bs
    from baatt.kernels.pallas_triton import block_sparse as tk

    b, h, d, block, L = 1, args.heads, 128, 128, args.length
    scale = 1.0 / math.sqrt(d)
    ks = jax.random.split(jax.random.PRNGKey(L), 4)
    q, k, v, do = [jax.random.normal(kk, (b, L, h, d), jnp.float32).astype(jnp.bfloat16) for kk in ks]
    nk = L // block
    kappa = max(1, math.ceil((1.0 - args.sparsity) * nk))
    cnt = jnp.full((b, h, nk), kappa, jnp.int32)
    idx = random_selection(jax.random.PRNGKey(L + 7), cnt, kappa, nk)
    tun = bs.BwdTuning(**VARIANTS[args.variant])
    kw = {"scale": scale, "block_q": block, "block_k": block, "positional": True, "t": tun}

    sel = bs.pack_selection(idx, cnt)
    selt = bs.pack_selection(*tk.transpose_selection(idx, cnt, nk))
    out, lse = jax.jit(lambda q, k, v, sel: bs.forward(q, k, v, sel, None, scale=scale, block_q=block,
                                                        block_k=block, positional=True))(q, k, v, sel)
    delta = jnp.swapaxes(jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1), 1, 2)
    lse2 = lse * bs.LOG2E
    calls = [("dq", jax.jit(lambda *a: bs._dq_call(*a, tile_k=block, **kw)), sel),
             ("dkv", jax.jit(lambda *a: bs._dkv_call(*a, **kw)), selt)]
    for name, fn, s in calls:
        for _ in range(args.reps):
            jax.block_until_ready(fn(q, k, v, None, s, lse2, delta, do))
        print(f"ran {name} x{args.reps}", flush=True)
    if not args.no_cudnn:
        _, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v))(q, k, v)
        apply = jax.jit(lambda fn, do: fn(do))
        for _ in range(args.reps):
            jax.block_until_ready(apply(vjp_fn, do))
        print(f"ran cudnn backward x{args.reps}", flush=True)


if __name__ == "__main__":
    main()
