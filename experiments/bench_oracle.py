"""PYTHONPATH=. python3 experiments/bench_oracle.py --out DIR

Speed of the streaming oracle map ``M_hat`` (SPEC.md section 1) on a GPU: the
Pallas (Triton) kernels of ``baatt.kernels.pallas_triton.oracle`` against cuDNN
dense attention forward (``jax.nn.dot_product_attention(implementation="cudnn")``),
measured in the same run on the same inputs.

Points: L in {32K, 128K}, B=1, H=32 (GQA off), D=128, bf16, block 128 (both
sides), synthetic Q/K/V with topic structure (``bench_sparse.synthetic_qkv``).
Times (median of repeated runs after a warm-up, inputs on device):

* ``map_ms``: both passes in block space (``oracle.post_downsample_blocked``);
* ``lse_ms``: pass 1 alone (``oracle.row_logsumexp``), so pass 2 ~ map - lse;
* ``full_ms``: ``oracle.post_downsample_map`` end to end (layout change included);
* ``cudnn_fwd_ms``: dense attention forward (needs V; the oracle does not).

``map_tflops`` counts 4*L^2*D*H (two Q@K^T passes, 2 flops per MAC), the same
count as a dense forward (Q@K^T + P@V), so ``map_vs_cudnn`` = cuDNN time / map
time compares equal work. Before timing, a correctness check against
``baatt.reference.post_downsample_map`` at L=4K (max abs error, row sums) is
stored too. Writes ``bench_oracle.json`` under ``--out`` (device, jax version,
git commit, date, config, rows; ``bench_oracle_partial.json`` after each length).
``--tune`` times tile variants instead (``bench_oracle_tune.json``); ``--smoke``
runs a tiny grid on the CPU in interpret mode (checks the script, times mean
nothing); ``--dry-run`` parses arguments and prints the config only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = (32768, 131072)
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = 128
    dtype: str = "bfloat16"
    check_length: int = 4096  # correctness check against the reference (fewer heads)
    check_heads: int = 4
    target_s: float = 0.6  # timing budget per measurement (after warm-up)
    min_reps: int = 3
    dense_impl: str = "cudnn"  # "xla" only for the CPU smoke run
    interpret: bool = False  # True only for the CPU smoke run


def get_config(smoke: bool = False) -> Config:
    if smoke:
        return Config(lengths=(256,), heads=2, head_dim=64, block=64, check_length=200, check_heads=2,
                      target_s=0.01, min_reps=1, dense_impl="xla", interpret=True)
    return Config()


def _meta(cfg: Config) -> dict:
    import jax

    from experiments.bench_sparse import _git_commit

    return dict(device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform, jax_version=jax.__version__,
                commit=_git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                config=dataclasses.asdict(cfg))


def check(cfg: Config) -> dict:
    """Kernel vs reference at a short length (positional and key-sorted block spaces)."""
    import jax
    import numpy as np

    from baatt import reference
    from baatt.kernels.pallas_triton import oracle
    from experiments.bench_sparse import synthetic_qkv

    small = dataclasses.replace(cfg, heads=cfg.check_heads)
    q, k, _ = synthetic_qkv(jax.random.PRNGKey(0), small, cfg.check_length)
    out = {}
    for name, k_perm in (("positional", None), ("sort_k", reference.norm_sort(k)[0])):
        got = np.asarray(oracle.post_downsample_map(q, k, block_size=cfg.block, k_perm=k_perm,
                                                    interpret=cfg.interpret))
        want = np.asarray(reference.post_downsample_map(q, k, block_size=cfg.block, k_perm=k_perm))
        out[name] = dict(max_abs_err=float(np.max(np.abs(got - want))),
                         max_row_sum_err=float(np.max(np.abs(got.sum(-1) - 1.0))),
                         finite=bool(np.all(np.isfinite(got))))
    print(json.dumps({"check": out}), flush=True)
    return out


def run(cfg: Config, partial_path: str | None = None) -> list[dict]:
    import jax

    from baatt import layout
    from baatt.kernels.pallas_triton import oracle
    from experiments.bench_sparse import _median_time, synthetic_qkv

    sync = jax.block_until_ready
    tm = lambda call: _median_time(call, sync, target_s=cfg.target_s, min_reps=cfg.min_reps)
    d, bs = cfg.head_dim, cfg.block
    scale = 1.0 / math.sqrt(d)
    rows = []
    for L in cfg.lengths:
        q, k, v = synthetic_qkv(jax.random.PRNGKey(L), cfg, L)
        sync((q, k, v))
        flops = 4.0 * cfg.batch * cfg.heads * L * L * d
        row = dict(L=L)
        try:
            dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=cfg.dense_impl))
            t = tm(lambda: dense(q, k, v))
            row.update(cudnn_fwd_ms=t * 1e3, cudnn_fwd_tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001
            row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        space = layout.to_block_space(q, k, None, block_q=bs, block_k=bs)
        args = (space.q, space.k, space.kv_valid)
        lse = jax.jit(lambda q, k, kv: oracle.row_logsumexp(q, k, kv, scale=scale, block_q=bs, block_k=bs,
                                                             interpret=cfg.interpret))
        blocked = jax.jit(lambda q, k, kv, qv: oracle.post_downsample_blocked(
            q, k, kv, qv, scale=scale, block_q=bs, block_k=bs, interpret=cfg.interpret))
        t_lse = tm(lambda: lse(*args))
        t_map = tm(lambda: blocked(*args, space.q_valid))
        t_full = tm(lambda: oracle.post_downsample_map(q, k, block_size=bs, interpret=cfg.interpret))
        m = blocked(*args, space.q_valid)
        row.update(lse_ms=t_lse * 1e3, map_ms=t_map * 1e3, pass2_ms=(t_map - t_lse) * 1e3, full_ms=t_full * 1e3,
                   map_tflops=flops / t_map / 1e12,
                   map_row_sum_err=float(jax.numpy.max(jax.numpy.abs(jax.numpy.sum(m, -1) - 1.0))))
        if "cudnn_fwd_ms" in row:
            row["map_vs_cudnn"] = row["cudnn_fwd_ms"] / row["map_ms"]
            row["full_vs_cudnn"] = row["cudnn_fwd_ms"] / row["full_ms"]
        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
        rows.append(row)
        del q, k, v, space, m
        if partial_path:  # keep what is done if the call is cut short
            with open(partial_path, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def run_tune(cfg: Config) -> list[dict]:
    """Tile variants of both passes at each length."""
    import jax

    from baatt import layout
    from baatt.kernels.pallas_triton import oracle
    from experiments.bench_sparse import _median_time, synthetic_qkv

    variants = {
        "default": oracle.Tuning(),
        "q64_k128": oracle.Tuning(q=64, k=128),
        "q128_k64": oracle.Tuning(q=128, k=64),
        "q64_k64_w4": oracle.Tuning(q=64, k=64, warps=4),
        "q128_k128_s3": oracle.Tuning(stages=3),
        "q128_k128_w4": oracle.Tuning(warps=4),
    }
    sync = jax.block_until_ready
    bs, d = cfg.block, cfg.head_dim
    rows = []
    for L in cfg.lengths:
        q, k, _ = synthetic_qkv(jax.random.PRNGKey(L), cfg, L)
        space = layout.to_block_space(q, k, None, block_q=bs, block_k=bs)
        flops = 4.0 * cfg.batch * cfg.heads * L * L * d
        for name, tun in variants.items():
            row = dict(L=L, variant=name)
            try:
                f = jax.jit(lambda q, k, kv, qv, t=tun: oracle.post_downsample_blocked(
                    q, k, kv, qv, scale=d ** -0.5, block_q=bs, block_k=bs, tuning=t, interpret=cfg.interpret))
                t = _median_time(lambda: f(space.q, space.k, space.kv_valid, space.q_valid), sync,
                                 target_s=cfg.target_s, min_reps=cfg.min_reps)
                row.update(map_ms=t * 1e3, map_tflops=flops / t / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        del q, k, space
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="comma-separated sequence lengths (default 32768,131072)")
    ap.add_argument("--tune", action="store_true", help="time kernel tile variants instead")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run in interpret mode")
    ap.add_argument("--dry-run", action="store_true", help="parse arguments, print the config, exit")
    args = ap.parse_args(argv)
    cfg = get_config(args.smoke)
    if args.lengths:
        cfg = dataclasses.replace(cfg, lengths=args.lengths)
    if args.dry_run:
        print(json.dumps(dict(out=args.out, tune=args.tune, config=dataclasses.asdict(cfg))))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        rows = run_tune(cfg)
        with open(os.path.join(args.out, "bench_oracle_tune.json"), "w") as f:
            json.dump(dict(meta=_meta(cfg), rows=rows), f, indent=1)
        return
    checked = None if args.no_check else check(cfg)
    rows = run(cfg, partial_path=os.path.join(args.out, "bench_oracle_partial.json"))
    with open(os.path.join(args.out, "bench_oracle.json"), "w") as f:
        json.dump(dict(meta=_meta(cfg), check=checked, rows=rows), f, indent=1)
    print(json.dumps(dict(meta=_meta(cfg), check=checked, rows=rows)))


if __name__ == "__main__":
    main()
