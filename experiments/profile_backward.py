"""python -m experiments.profile_backward --length 32768 --sparsity 0.9

Runs the Mosaic GPU backward kernels a few times for a hardware-counter profiler on a GPU, e.g.

    ncu --clock-control none --kernel-name regex:'baatt_block_sparse_d|sdpa|flash' --launch-count 6 \\
        --section SpeedOfLight --section WarpStateStats -o bwd \\
        python -m experiments.profile_backward --length 32768 --sparsity 0.9

The inputs, selection and kernel calls of ``experiments.bench_backward`` (B=1, H=32, D=128,
bf16, block 128, random selection of ``ceil((1 - s) * Nk)`` blocks per row): the dq kernel and
the dk/dv kernel alone (``--variant`` picks the ``BwdTuning``), then cuDNN's backward on the
same arrays, each ``--reps`` times after one compile. Nothing is timed or written here: the
profiler does that.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from baatt.kernels import mosaic_gpu
from experiments import bench_backward, harness


@dataclasses.dataclass(frozen=True)
class Config:
    length: int = harness.option(32768, "sequence length")
    sparsity: float = harness.option(0.9, "sparsity (equal counts in every row)")
    heads: int = 32
    variant: str = harness.option("default", "BwdTuning variant", choices=tuple(bench_backward.VARIANTS))
    reps: int = harness.option(2, "runs of each kernel after its compile")
    cudnn: bool = harness.option(True, "also run cuDNN's backward")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def main(argv=None) -> None:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    q, k, v, do = bench_backward.inputs(cfg.length, cfg.heads)
    idx, cnt, _ = bench_backward.equal_count_selection(cfg.length, cfg.sparsity, cfg.heads)
    calls = bench_backward.kernel_calls(mosaic_gpu.BwdTuning(**bench_backward.VARIANTS[cfg.variant]), "positional",
                                        q, k, v, idx, cnt, do, 1.0 / math.sqrt(q.shape[-1]))
    for name in ["dq", "dkv"] + (["cudnn backward"] if cfg.cudnn else []):
        if name == "cudnn backward":  # its forward runs here, after the kernels: a profiler sees them first
            calls[name] = harness.dense_backward_call(q, k, v, do, "cudnn")
        for _ in range(cfg.reps):
            jax.block_until_ready(calls[name]())
        print(f"ran {name} x{cfg.reps}", flush=True)


if __name__ == "__main__":
    main()
