"""PYTHONPATH=. python3 experiments/bench_sparse.py --out $OUT

Block-sparse attention speed on a GPU: the portable Pallas (Triton) kernel of
``implementation="pallas"`` against cuDNN (``jax.nn.dot_product_attention(
implementation=cfg.dense_impl)``) and FlashAttention-2 (torch SDPA, flash backend),
all measured in the same run.

Grid (``get_config``): L in {8K, 16K, 32K, 64K, 128K}, sparsity in {0, 50, 70,
90, 95}%, B=1, H=32, D=128, bf16, bidirectional, block 128. For each point:

* ``ba``: the BA-Att selection (reference estimator, ``BAConfig(sparsity=s)``,
  default switches) computed on realistic synthetic Q/K/V (``synthetic_qkv``:
  recurring topics, so attention is content-driven and block structured);
* ``random``: a random selection with the same number of blocks per row.

Times (median of repeated runs after a warm-up, inputs on device):

* ``kernel_fwd`` / ``kernel_fwdbwd``: the Pallas kernel alone in block space
  (selection precomputed); fwd+bwd is ``vjp`` with a given output cotangent;
* ``est``: the BA-Att estimator alone (``select_blocks``);
* ``full_fwd``: ``baatt.attention(..., implementation="pallas")`` end to end
  (estimation, layout changes, kernel, scatter back);
* ``cudnn_*`` and ``fa2_*``: the dense kernels (FA2 runs in a torch
  subprocess so that the two frameworks never share the GPU memory pool).

TFLOP/s count only computed blocks: forward 4*bq*bk*D per selected block
pair, forward+backward 3.5x that (backward = 2.5x forward), dense likewise
with every pair. Writes ``bench_sparse.json`` and ``bench_sparse.md`` under
``--out`` (device name, jax/torch versions, git commit, date inside), prints
the markdown table last. ``--quick`` runs a small grid; ``--tune`` times kernel
tile variants instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9, 0.95)
    # Optional trims to fit one 10-minute device call: from ``long_from`` tokens on, only
    # ``long_sparsities`` and fwd+bwd only at ``fwdbwd_sparsities_long`` (off by default: the full
    # grid took ~5 min on an H200).
    long_sparsities: tuple[float, ...] = (0.0, 0.5, 0.9, 0.95)
    long_from: int = 1 << 30
    fwdbwd_sparsities_long: tuple[float, ...] = (0.0, 0.9)
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = 128
    dtype: str = "bfloat16"
    target_s: float = 0.6  # timing budget per measurement (after warm-up)
    min_reps: int = 3
    dense_impl: str = "cudnn"  # "xla" only for the CPU smoke run (--smoke)
    impl: str = "pallas"  # the block-sparse implementation timed: "pallas" or "mosaic_gpu"
    interpret: bool = False  # True only for the CPU smoke run


def get_config(quick: bool = False, smoke: bool = False) -> Config:
    if smoke:  # CPU, interpret mode: checks the script end to end, times mean nothing
        return Config(lengths=(512,), sparsities=(0.0, 0.5), heads=2, head_dim=64, block=64, target_s=0.01,
                      min_reps=1, dense_impl="xla", interpret=True, long_from=1 << 30)
    if quick:
        return Config(lengths=(8192, 32768), sparsities=(0.0, 0.9), long_from=1 << 30)
    return Config()


# ----------------------------------------------------------------------------- helpers


def _git_commit() -> str:
    if os.environ.get("BAATT_COMMIT"):  # the device copy of the tree may have no usable .git
        return os.environ["BAATT_COMMIT"]
    try:
        out = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        return out if len(out) == 40 else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def run_meta(**extra) -> dict:
    """device, jax version, commit and date of a benchmark run, plus ``extra`` fields."""
    import jax

    return dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, commit=_git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)


def write_results(out_dir: str, stem: str, meta: dict, rows: list, md: str) -> None:
    """``<stem>.json`` ({meta, rows}) and ``<stem>.md`` under ``out_dir``; prints the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
    print(md)


def _median_time(call, sync, *, target_s: float, min_reps: int) -> float:
    """Median seconds per call: warm-up, then batches of calls (amortising dispatch) timed with a sync."""
    sync(call())  # compile / warm-up
    t0 = time.perf_counter()
    sync(call())
    est = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(50, int(0.02 / est)))
    reps = max(min_reps, min(25, int(target_s / (est * inner))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = call()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------- torch (FA2)


def run_torch(cfg: Config, lengths, out_path: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    dt = getattr(torch, cfg.dtype)
    # No jax in this process (torch owns the GPU here); its version comes from the package metadata.
    from importlib.metadata import version

    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "jax_version": version("jax"),
           "commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "fa2": {}}

    def sync(_):
        torch.cuda.synchronize()

    for L in lengths:
        g = torch.Generator(device=dev).manual_seed(L)
        shape = (cfg.batch, cfg.heads, L, cfg.head_dim)
        q, k, v, do = (torch.randn(shape, device=dev, dtype=dt, generator=g) for _ in range(4))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fwd = _median_time(lambda: F.scaled_dot_product_attention(q, k, v), sync,
                               target_s=cfg.target_s, min_reps=cfg.min_reps)
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def fb():
                out = F.scaled_dot_product_attention(qg, kg, vg)
                out.backward(do)
                qg.grad = kg.grad = vg.grad = None
                return out

            fwdbwd = _median_time(fb, sync, target_s=cfg.target_s, min_reps=cfg.min_reps)
        res["fa2"][str(L)] = {"fwd_ms": fwd * 1e3, "fwdbwd_ms": fwdbwd * 1e3}
        print(f"[fa2] L={L} fwd {fwd*1e3:.2f} ms fwd+bwd {fwdbwd*1e3:.2f} ms", flush=True)
        del q, k, v, do, qg, kg, vg
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- jax


def synthetic_qkv(key, cfg: Config, L: int):
    """Q/K/V [B, L, H, D] with content structure: recurring topics in segments of ~512 tokens.

    Each position belongs to one of 64 topics (segments of geometric length,
    topics drawn at random, so a topic recurs far away); per head, queries and
    keys of a topic share a direction (logit ~ 2.5 between same-topic tokens),
    plus token noise. Attention is then content-driven and block structured,
    not uniform, like a real long document.
    """
    import jax
    import jax.numpy as jnp

    b, h, d = cfg.batch, cfg.heads, cfg.head_dim
    n_topics = 64
    ks = jax.random.split(key, 8)
    change = jax.random.bernoulli(ks[0], 1.0 / 512, (b, L))
    seg = jnp.cumsum(change, axis=1)
    seg_topic = jax.random.randint(ks[1], (b, L // 16 + 2), 0, n_topics)
    topic = jnp.take_along_axis(seg_topic, jnp.minimum(seg, seg_topic.shape[1] - 1), axis=1)  # [B, L]
    centre = jax.random.normal(ks[2], (h, n_topics, d)) * (2.5 * math.sqrt(d)) ** 0.5 / d ** 0.5
    cq = centre[:, topic].transpose(1, 2, 0, 3)  # [B, L, H, D]
    noise = lambda k_: jax.random.normal(k_, (b, L, h, d))
    q = cq + 0.8 * noise(ks[3])
    kk = cq + 0.8 * noise(ks[4])
    v = noise(ks[5])
    dt = jnp.dtype(cfg.dtype)
    return q.astype(dt), kk.astype(dt), v.astype(dt)


def random_selection(key, counts, nk: int):
    """Random ids with the given per-row counts, ascending, padded to width nk (tail repeats the last)."""
    import jax
    import jax.numpy as jnp

    r = jax.random.uniform(key, counts.shape + (nk,))
    order = jnp.argsort(r, axis=-1).astype(jnp.int32)
    live = jnp.arange(nk) < counts[..., None]
    kept = jnp.sort(jnp.where(live, order, nk), axis=-1)
    last = jnp.take_along_axis(kept, (counts - 1)[..., None], axis=-1)
    return jnp.where(live, kept, last).astype(jnp.int32)


def pad_indices(indices, counts, nk: int):
    """[.., kmax] -> [.., nk]: one static width per length, so the kernel compiles once per L."""
    import jax.numpy as jnp

    kmax = indices.shape[-1]
    if kmax == nk:
        return indices
    last = jnp.take_along_axis(indices, (counts - 1)[..., None], axis=-1)
    return jnp.concatenate([indices, jnp.broadcast_to(last, indices.shape[:-1] + (nk - kmax,))], axis=-1)


def run_jax(cfg: Config, fa2: dict, tuning=None, partial_path: str | None = None) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import baatt
    from baatt import layout
    from baatt.kernels import mosaic_gpu
    from baatt.kernels.pallas_triton import DEFAULT_TUNING, block_sparse_attention
    from baatt.selection import select_blocks

    tuning = DEFAULT_TUNING if tuning is None else tuning
    mosaic = cfg.impl == "mosaic_gpu"
    rows = []
    sync = jax.block_until_ready
    tm = lambda call: _median_time(call, sync, target_s=cfg.target_s, min_reps=cfg.min_reps)
    d, bs = cfg.head_dim, cfg.block
    scale = 1.0 / math.sqrt(d)
    for L in cfg.lengths:
        key = jax.random.PRNGKey(L)
        q, k, v = synthetic_qkv(key, cfg, L)
        do = jax.random.normal(jax.random.PRNGKey(L + 1), q.shape, q.dtype)
        sync((q, k, v, do))
        dense_fwd_flops = 4.0 * cfg.batch * cfg.heads * L * L * d

        cudnn_fwd = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=cfg.dense_impl))

        @jax.jit
        def cudnn_fb(q, k, v, do):
            out, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=cfg.dense_impl), q, k, v)
            return out, vjp(do)

        t_cudnn = tm(lambda: cudnn_fwd(q, k, v))
        t_cudnn_fb = tm(lambda: cudnn_fb(q, k, v, do))
        print(f"[cudnn] L={L} fwd {t_cudnn*1e3:.2f} ms fwd+bwd {t_cudnn_fb*1e3:.2f} ms", flush=True)

        space = layout.to_block_space(q, k, v, block_q=bs, block_k=bs)
        nk = space.num_k_blocks
        do_b = jnp.swapaxes(do, 1, 2)

        def sparse_op(q, k, v, valid, idx, cnt):
            if mosaic:  # the caller's [B, L, H, D] layout (the path baatt.attention takes without sort/mask)
                return mosaic_gpu.positional_attention(q, k, v, idx, cnt, scale=scale, block_q=bs, block_k=bs)
            return block_sparse_attention(q, k, v, valid, idx, cnt, scale=scale, block_q=bs, block_k=bs,
                                          tuning=tuning, interpret=cfg.interpret)

        kern = jax.jit(sparse_op)

        @jax.jit
        def kern_fb(q, k, v, valid, idx, cnt, do):
            out, vjp = jax.vjp(lambda q, k, v: sparse_op(q, k, v, valid, idx, cnt)[0], q, k, v)
            return out, vjp(do)

        sparsities = cfg.long_sparsities if L >= cfg.long_from else cfg.sparsities
        for s in sparsities:
            bcfg = baatt.BAConfig(block_size=bs, sparsity=s)
            est_fn = jax.jit(lambda q, k: select_blocks(q, k, bcfg))
            t_est = tm(lambda: est_fn(q, k))
            sel = est_fn(q, k)
            full_fn = jax.jit(lambda q, k, v: baatt.attention(q, k, v, config=bcfg, implementation=cfg.impl,
                                                                   interpret=cfg.interpret))
            t_full = tm(lambda: full_fn(q, k, v))
            # Mosaic GPU: the selection's own width, as baatt.attention passes it (the forward picks its
            # persistent or one-CTA-per-tile variant from it); the portable kernel: width Nk, one compile per L.
            width = sel.indices.shape[-1] if mosaic else nk
            sel_ba = pad_indices(sel.indices, sel.counts, nk)[..., :width]
            sel_rand = random_selection(jax.random.PRNGKey(L + 7), sel.counts, nk)[..., :width]
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
            del sel, sel_ba, sel_rand
        del q, k, v, do, do_b, space
        if partial_path:  # keep what is done if the call is cut short
            with open(partial_path, "w") as f:
                json.dump(rows, f)
    return rows


def run_tune(cfg: Config) -> list[dict]:
    """Kernel tile variants at two lengths and two sparsities (random selections)."""
    import jax
    import jax.numpy as jnp

    from baatt import layout
    from baatt.kernels.pallas_triton import Tuning, block_sparse_attention

    variants = {
        "default": Tuning(),
        "fwd_rotate": Tuning(fwd_rotate=True),
        "fwd_rotate_s2": Tuning(fwd_rotate=True, fwd_stages=2),
    }
    rows = []
    sync = jax.block_until_ready
    bs, d = cfg.block, cfg.head_dim
    for L in (16384, 131072):
        q, k, v = synthetic_qkv(jax.random.PRNGKey(L), cfg, L)
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=cfg.dense_impl))
        t = _median_time(lambda: cud(q, k, v), sync, target_s=cfg.target_s, min_reps=3)
        row = dict(L=L, variant="cudnn_dense", fwd_ms=t * 1e3, fwd_tflops=4.0 * L * L * d * cfg.heads / t / 1e12)
        print(json.dumps(row), flush=True)
        rows.append(row)
        space = layout.to_block_space(q, k, v, block_q=bs, block_k=bs)
        nk = space.num_k_blocks
        do_b = jnp.swapaxes(jax.random.normal(jax.random.PRNGKey(1), q.shape, q.dtype), 1, 2)
        for s in (0.0, 0.9):
            kappa = max(1, math.ceil((1 - s) * nk))
            counts = jnp.full((cfg.batch, cfg.heads, nk), kappa, jnp.int32)
            idx = random_selection(jax.random.PRNGKey(3), counts, nk)
            flops = 4.0 * bs * bs * d * float(jnp.sum(counts))
            for name, tun in variants.items():
                fwd_only = name.startswith("fwd") or name == "default"
                bwd_only = name.startswith("bwd")
                args = (space.q, space.k, space.v, space.kv_valid, idx, counts)
                row = dict(L=L, sparsity=s, variant=name)
                try:
                    if not bwd_only:
                        f = jax.jit(lambda *a, t=tun: block_sparse_attention(*a, scale=d ** -0.5, block_q=bs,
                                                                               block_k=bs, tuning=t))
                        t = _median_time(lambda: f(*args), sync, target_s=cfg.target_s, min_reps=3)
                        row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12)
                    if not fwd_only or name == "default":
                        @jax.jit
                        def fb(q, k, v, valid, idx, cnt, do, t=tun):
                            g = lambda q, k, v: block_sparse_attention(q, k, v, valid, idx, cnt, scale=d ** -0.5,
                                                                       block_q=bs, block_k=bs, tuning=t)[0]
                            out, vjp = jax.vjp(g, q, k, v)
                            return out, vjp(do)
                        t = _median_time(lambda: fb(*args, do_b), sync, target_s=cfg.target_s, min_reps=3)
                        row.update(fwdbwd_ms=t * 1e3, fwdbwd_tflops=3.5 * flops / t / 1e12)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


MOSAIC_FWD_VARIANTS = {  # name -> mosaic_gpu.Tuning keyword arguments (the first is the reference output)
    "one_per_tile": dict(persistent=False),  # explicit: the default Tuning picks by walk length
    "persistent": dict(persistent=True),
    "persistent_heads_fastest": dict(persistent=True, tile_major=False),
}


def run_tune_mosaic(cfg: Config, lengths=(32768, 131072), sparsities=(0.0, 0.5, 0.9)) -> list[dict]:
    """Mosaic GPU forward variants (``MOSAIC_FWD_VARIANTS``) on BA-Att selections, in the caller's layout
    (the path ``baatt.attention`` takes without sorting), against cuDNN's dense forward in the same run;
    each variant's output is compared with the first variant's."""
    import jax
    import jax.numpy as jnp

    import baatt
    from baatt.kernels import mosaic_gpu
    from baatt.selection import select_blocks

    rows = []
    sync = jax.block_until_ready
    tm = lambda call: _median_time(call, sync, target_s=cfg.target_s, min_reps=5)
    bs, d = cfg.block, cfg.head_dim
    for L in lengths:
        q, k, v = synthetic_qkv(jax.random.PRNGKey(L), cfg, L)
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=cfg.dense_impl))
        t_dense = tm(lambda: cud(q, k, v))
        dense_tflops = 4.0 * L * L * d * cfg.heads * cfg.batch / t_dense / 1e12
        print(json.dumps(dict(L=L, variant="cudnn_dense", fwd_ms=t_dense * 1e3, fwd_tflops=dense_tflops)), flush=True)
        for s in sparsities:
            sel = sync(jax.jit(lambda q, k: select_blocks(q, k, baatt.BAConfig(block_size=bs, sparsity=s)))(q, k))
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
        del q, k, v
    return rows


def tune_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Mosaic GPU forward variants ({meta['device']}, jax {meta['jax_version']}, commit {meta['commit'][:10]}, "
             f"{meta['date']})", "", "B=1 H=32 D=128 bf16, block 128, BA-Att selections, caller's layout; throughput "
             "over computed blocks against cuDNN's dense forward in the same run.", "",
             f"| L | sparsity | variant | fwd ms | TFLOP/s | % cuDNN thr. | max abs diff vs {next(iter(MOSAIC_FWD_VARIANTS))} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "sparsity" not in r:
            continue
        if "error" in r:
            lines.append(f"| {r['L'] // 1024}K | {r['sparsity']} | {r['variant']} | failed: {r['error'][:120]} | | | |")
            continue
        lines.append(f"| {r['L'] // 1024}K | {int(round(100 * r['sparsity']))}% | {r['variant']} | {r['fwd_ms']:.2f} "
                     f"| {r['fwd_tflops']:.0f} | {100 * r['frac_cudnn_throughput']:.1f}% "
                     f"| {r['max_abs_diff_vs_first']:.2e} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# bench_sparse ({meta['config'].get('impl', 'pallas')}): {meta['device']}, jax {meta['jax_version']}, "
        f"torch {meta.get('torch', '?')}, "
        f"commit {meta['commit'][:10]}, {meta['date']}",
        "",
        f"B={meta['config']['batch']} H={meta['config']['heads']} D={meta['config']['head_dim']} "
        f"{meta['config']['dtype']} bidirectional, block {meta['config']['block']}. ms = median. "
        "TFLOP/s count computed blocks only (fwd+bwd = 3.5x fwd). x = speedup (baseline time / ours).",
        "",
        "| L | sparsity | sel | kernel fwd ms | TFLOP/s | % cuDNN thr. | est ms | full fwd ms | cuDNN fwd ms "
        "| FA2 fwd ms | kernel x cuDNN | full x cuDNN | full x FA2 | kernel fwd+bwd ms | cuDNN fwd+bwd ms "
        "| FA2 fwd+bwd ms | fwd+bwd x cuDNN | fwd+bwd x FA2 |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        lines.append(
            f"| {r['L'] // 1024}K | {int(round(r['sparsity'] * 100))}% | {r['selection']} | {_fmt(r['kernel_fwd_ms'])} "
            f"| {_fmt(r['kernel_fwd_tflops'], 0)} | {_fmt(100 * r['kernel_frac_cudnn_throughput'], 0)}% "
            f"| {_fmt(r.get('est_ms'))} | {_fmt(r.get('full_fwd_ms'))} | {_fmt(r['cudnn_fwd_ms'])} "
            f"| {_fmt(r.get('fa2_fwd_ms'))} | {_fmt(r['kernel_vs_cudnn_fwd'])} | {_fmt(r.get('full_vs_cudnn_fwd'))} "
            f"| {_fmt(r.get('full_vs_fa2_fwd'))} | {_fmt(r['kernel_fwdbwd_ms'])} | {_fmt(r['cudnn_fwdbwd_ms'])} "
            f"| {_fmt(r.get('fa2_fwdbwd_ms'))} | {_fmt(r['kernel_vs_cudnn_fwdbwd'])} "
            f"| {_fmt(r.get('kernel_vs_fa2_fwdbwd'))} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--torch-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--impl", default="pallas", choices=("pallas", "mosaic_gpu"), help="block-sparse implementation")
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default: the config's)")
    ap.add_argument("--sparsities", default=None, help="comma-separated sparsities (default: the config's)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run in interpret mode (no torch)")
    args = ap.parse_args()
    cfg = get_config(args.quick, args.smoke)
    over = dict(impl=args.impl)
    if args.lengths:
        over["lengths"] = tuple(int(x) for x in args.lengths.split(","))
    if args.sparsities:
        over["sparsities"] = tuple(float(x) for x in args.sparsities.split(","))
    cfg = dataclasses.replace(cfg, **over)
    args.no_torch |= args.smoke
    stem = "bench_sparse" if cfg.impl == "pallas" else f"bench_sparse_{cfg.impl}"
    os.makedirs(args.out, exist_ok=True)
    if args.torch_only:
        run_torch(cfg, cfg.lengths, args.torch_only)
        return
    if args.tune and cfg.impl == "mosaic_gpu":
        rows = run_tune_mosaic(cfg, **({"lengths": cfg.lengths} if args.lengths else {}),
                               **({"sparsities": cfg.sparsities} if args.sparsities else {}))
        meta = run_meta(config=dataclasses.asdict(cfg))
        write_results(args.out, "bench_sparse_mosaic_gpu_fwd_tune", meta, rows, tune_markdown(meta, rows))
        return
    if args.tune:
        rows = run_tune(cfg)
        import jax

        meta = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, commit=_git_commit())
        with open(os.path.join(args.out, "bench_sparse_tune.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        return
    fa2, torch_meta = {}, {}
    if not args.no_torch:
        tpath = os.path.join(args.out, f"{stem}_fa2.json")
        cmd = [sys.executable, __file__, "--torch-only", tpath] + (["--quick"] if args.quick else []) + (
            ["--lengths", args.lengths] if args.lengths else [])
        r = subprocess.run(cmd)
        if r.returncode == 0 and os.path.exists(tpath):
            with open(tpath) as f:
                tres = json.load(f)
            fa2, torch_meta = tres["fa2"], {"torch": tres["torch"]}
    rows = run_jax(cfg, fa2, partial_path=os.path.join(args.out, f"{stem}_partial.json"))
    meta = run_meta(config=dataclasses.asdict(cfg), **torch_meta)
    write_results(args.out, stem, meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
