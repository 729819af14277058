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

from experiments.bench_backward import (
    VARIANTS,
    dense_backward_call,
    equal_count_selection,
    kernel_calls,
    random_inputs,
)


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

    from baatt.kernels.mosaic_gpu import block_sparse as bs

    block = 128
    q, k, v, do = random_inputs(args.length, args.heads)
    idx, cnt, _ = equal_count_selection(args.length, args.sparsity, args.heads, block)
    calls = kernel_calls(bs, bs.BwdTuning(**VARIANTS[args.variant]), "positional", q, k, v, idx, cnt, do,
                         1.0 / math.sqrt(q.shape[-1]), block)
    for name in ["dq", "dkv"] + ([] if args.no_cudnn else ["cudnn backward"]):
        if name == "cudnn backward":  # its forward runs here, after the kernels: a profiler sees them first
            calls[name] = dense_backward_call(q, k, v, do, "cudnn")
        for _ in range(args.reps):
            jax.block_until_ready(calls[name]())
        print(f"ran {name} x{args.reps}", flush=True)


if __name__ == "__main__":
    main()
