"""python -m experiments.bench_oracle

Speed of the streaming oracle map ``M_hat`` (docs/spec.md section 1) on a GPU: the Pallas
(Triton) kernels of ``baatt.kernels.pallas_triton.oracle`` against cuDNN dense attention
forward (``jax.nn.dot_product_attention(implementation="cudnn")``), measured in the same
run on the same inputs.

Points: L in {32K, 128K}, B=1, H=32 (GQA off), D=128, bf16, block 128 (both sides), the
structured synthetic Q/K/V of ``baatt.synthetic``. Times (``harness.median_time``: median
of repeated runs after a warm-up, inputs on device):

* ``map_ms``: both passes in block space (``oracle.post_downsample_blocked``);
* ``lse_ms``: pass 1 alone (``oracle.row_logsumexp``), so pass 2 ~ map - lse;
* ``full_ms``: ``oracle.post_downsample_map`` end to end (layout change included);
* ``cudnn_fwd_ms``: dense attention forward (needs V; the oracle does not).

``map_tflops`` counts 4*L^2*D*H (two Q@K^T passes, 2 flops per MAC), the same count as a
dense forward (Q@K^T + P@V), so ``map_vs_cudnn`` = cuDNN time / map time compares equal
work. Before timing, a correctness check against ``baatt.reference.post_downsample_map`` at
L=4K (max abs error, row sums) is stored too (``--no-check`` skips it). Writes
``bench_oracle.json`` / ``.md`` under ``--out`` (default ``experiments/results/bench_oracle/``;
``bench_oracle_partial.json`` after each length, until the run completes). ``--tune`` times
tile variants instead (``bench_oracle_tune.json``); ``--preset smoke`` runs a tiny grid on the
CPU in interpret mode (checks the script, times mean nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from baatt import layout, reference
from baatt.kernels.pallas_triton import oracle
from experiments import harness


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((32768, 131072), "sequence lengths")
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    check_length: int = harness.option(4096, "length of the correctness check against the reference")
    check_heads: int = harness.option(4, "heads of the correctness check")
    target_s: float = harness.option(0.6, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the dense baseline")
    interpret: bool = harness.option(False, "Pallas interpret mode (CPU smoke runs)")
    check: bool = harness.option(True, "check the kernels against the reference before timing")
    tune: bool = harness.option(False, "time kernel tile variants instead")
    out: str = harness.option(harness.study_dir("bench_oracle"), "output folder")


PRESETS = {
    "full": Config(),
    "smoke": Config(lengths=(256,), heads=2, head_dim=64, block=64, check_length=200, check_heads=2,
                    target_s=0.01, min_reps=1, dense_impl="xla", interpret=True),
}


def get_config(preset: str = "full", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def inputs(cfg: Config, length: int, heads: int | None = None, seed: int | None = None):
    """q, k, v [B, L, H, D] (``harness.synthetic_inputs``), on device."""
    return jax.block_until_ready(harness.synthetic_inputs(length, batch=cfg.batch, heads=heads or cfg.heads,
                                                          head_dim=cfg.head_dim, dtype=cfg.dtype, seed=seed))


def check(cfg: Config) -> dict:
    """Kernel vs reference at a short length (positional and key-sorted block spaces)."""
    q, k, _ = inputs(cfg, cfg.check_length, heads=cfg.check_heads, seed=0)
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


def run(cfg: Config, partial_path: Path | None = None) -> list[dict]:
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    d, bs = cfg.head_dim, cfg.block
    scale = 1.0 / math.sqrt(d)
    dense = harness.dense_attention(cfg.dense_impl)
    rows = []
    for L in cfg.lengths:
        q, k, v = inputs(cfg, L)
        flops = 4.0 * cfg.batch * cfg.heads * L * L * d
        row = dict(L=L)
        try:
            t = tm(lambda: dense(q, k, v))
            row.update(cudnn_fwd_ms=t * 1e3, cudnn_fwd_tflops=flops / t / 1e12)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, the kernels still timed
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
                   map_row_sum_err=float(jnp.max(jnp.abs(jnp.sum(m, -1) - 1.0))))
        if "cudnn_fwd_ms" in row:
            row["map_vs_cudnn"] = row["cudnn_fwd_ms"] / row["map_ms"]
            row["full_vs_cudnn"] = row["cudnn_fwd_ms"] / row["full_ms"]
        print(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
        rows.append(row)
        q = k = v = space = m = None  # frees device memory before the next size
        if partial_path:  # keep what is done if the run is cut short (removed once the run completes)
            partial_path.write_text(json.dumps(rows, indent=1))
    return rows


TILE_VARIANTS = {  # name -> oracle.Tuning keyword arguments
    "default": {},
    "q64_k128": dict(q=64, k=128),
    "q128_k64": dict(q=128, k=64),
    "q64_k64_w4": dict(q=64, k=64, warps=4),
    "q128_k128_s3": dict(stages=3),
    "q128_k128_w4": dict(warps=4),
}


def run_tune(cfg: Config) -> list[dict]:
    """``TILE_VARIANTS`` of both passes at each length."""
    tm = lambda call: harness.median_time(call, target_s=cfg.target_s, min_reps=cfg.min_reps)
    bs, d = cfg.block, cfg.head_dim
    rows = []
    for L in cfg.lengths:
        q, k, _ = inputs(cfg, L)
        space = layout.to_block_space(q, k, None, block_q=bs, block_k=bs)
        flops = 4.0 * cfg.batch * cfg.heads * L * L * d
        for name, kw in TILE_VARIANTS.items():
            row = dict(L=L, variant=name)
            try:
                f = jax.jit(lambda q, k, kv, qv, t=oracle.Tuning(**kw): oracle.post_downsample_blocked(
                    q, k, kv, qv, scale=d ** -0.5, block_q=bs, block_k=bs, tuning=t, interpret=cfg.interpret))
                t = tm(lambda: f(space.q, space.k, space.kv_valid, space.q_valid))
                row.update(map_ms=t * 1e3, map_tflops=flops / t / 1e12)
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result to report
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        q = k = space = None  # frees device memory before the next size
    return rows


def markdown(meta: dict, checked: dict | None, rows: list[dict]) -> str:
    cfg = meta["config"]
    lines = [f"# Oracle post-downsample map, Pallas (Triton) kernel: {harness.describe_run(meta)}", "",
             f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}, block {cfg['block']}; two passes "
             "(row log-sum-exp, then pooled probabilities), memory linear in L; dense forward timed in the same run."]
    if checked:
        lines[-1] += (f" Checked against the reference at {cfg['check_length']} tokens (max abs error "
                      f"{checked['positional']['max_abs_err']:.1e} positional, {checked['sort_k']['max_abs_err']:.1e} "
                      "key-sorted).")
    lines += ["", "| L | dense fwd ms | lse pass ms | map pass ms | full map ms | map time / dense time |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        dense = r.get("cudnn_fwd_ms")
        dense_ms, ratio = ("-", "-") if dense is None else (f"{dense:.1f}", f"{r['full_ms'] / dense:.2f}x")
        lines.append(f"| {harness.format_length(r['L'])} | {dense_ms} | {r['lse_ms']:.1f} | {r['pass2_ms']:.1f} "
                     f"| {r['full_ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tune:
        rows = run_tune(cfg)
        result = dict(meta=harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg)), rows=rows)
        harness.write_results(out, {"bench_oracle_tune.json": result})
        return result
    checked = check(cfg) if cfg.check else None
    partial = out / "bench_oracle_partial.json"
    rows = run(cfg, partial_path=partial)
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg))
    md = markdown(meta, checked, rows)
    result = dict(meta=meta, check=checked, rows=rows)
    harness.write_results(out, {"bench_oracle.json": result, "bench_oracle.md": md})
    partial.unlink(missing_ok=True)
    print(md)
    return result


if __name__ == "__main__":
    main()
