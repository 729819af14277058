"""python -m experiments.bench_sharding

BA-Att across GPUs (``baatt.sharding.sharded_attention``): context parallelism (the sequence
split over the GPUs; K/V exchanged by all-gather or by the ring) and head parallelism, against
dense cuDNN attention (``jax.nn.dot_product_attention(implementation=dense_impl)``) under the
same sharding, forward and forward+backward. Run it on a host with as many GPUs as the largest
of ``--device-counts``; ``--preset one_gpu`` runs the one-GPU part alone.

* ``one_gpu`` rows: the sharded code path on a mesh of one GPU against the plain
  ``baatt.attention`` call, at ``one_gpu_length`` (default 128K tokens): what ``shard_map``
  itself costs (nothing is communicated on one device).
* ``scaling`` rows: for every length (default 128K, 256K, 512K, 1M tokens), sparsity (90%,
  95%), number of GPUs n (1, 2, 4) and mode: BA-Att, and the dense baseline where
  ``dense_max_length`` allows (dense attention at 1M tokens takes ~30 s a call on one GPU).
  Dense context parallelism all-gathers K/V, then each GPU attends its queries to every key;
  dense head parallelism splits the heads.

Each row records the median time (``harness.median_time``), the scaling efficiency
``t(1 GPU) / (n * t(n GPUs))`` of the same row at n = 1, the bytes each device receives through
collectives (``baatt.sharding.collectives`` on the compiled HLO: gathered statistics, K/V, the
backward's reductions) and the memory per device from the compiled program's memory analysis
(arguments + outputs + temporaries). B=1, H=32, D=128, bf16, block 128, fixed-budget
sparsity (``BAConfig(sparsity=s)``); inputs are ``jax.random.normal`` made on the devices in
their shards (at a fixed budget the work does not depend on the values; the NumPy-built
synthetic inputs of the other benchmarks would take minutes at 1M tokens).

Writes ``bench_sharding.json`` / ``.md`` under ``--out`` (default
``experiments/results/bench_sharding/``; ``bench_sharding_partial.json`` while running) and
prints the markdown table last. ``--preset smoke`` is a CPU run on 2 host devices
(``JAX_NUM_CPU_DEVICES=2`` or more) that checks the script; its times mean nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import baatt
from baatt import sharding
from experiments import harness

# (mode, kv_exchange) pairs: how the work is split and how keys/values travel.
VARIANTS = {"heads": ("heads", None), "context_all_gather": ("context", "all_gather"),
            "context_ring": ("context", "ring")}
PASSES = ("fwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = harness.option((131072, 262144, 524288, 1048576), "sequence lengths (scaling part)")
    sparsities: tuple[float, ...] = harness.option((0.9, 0.95), "fixed-budget sparsities (scaling part)")
    device_counts: tuple[int, ...] = harness.option((1, 2, 4), "numbers of GPUs (scaling part)")
    variants: tuple[str, ...] = harness.option(tuple(VARIANTS), "sharding modes timed", choices=tuple(VARIANTS))
    passes: tuple[str, ...] = harness.option(PASSES, "forward, forward+backward", choices=PASSES)
    scaling: bool = harness.option(True, "run the scaling part")
    one_gpu: bool = harness.option(True, "run the one-GPU part (sharded path on one GPU vs the plain call)")
    one_gpu_length: int = harness.option(131072, "sequence length of the one-GPU part")
    one_gpu_sparsity: float = harness.option(0.9, "sparsity of the one-GPU part")
    dense: bool = harness.option(True, "time the dense baseline under the same sharding")
    dense_max_length: int = harness.option(262144, "longest length at which the dense baseline is timed")
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    block: int = harness.option(128, "query and key block size")
    dtype: str = "bfloat16"
    impl: str | None = harness.option(None, "baatt implementation (none: the best available)")
    dense_impl: str = harness.option("cudnn", "jax.nn.dot_product_attention implementation of the baseline")
    target_s: float = harness.option(0.6, "timing budget per measurement after warm-up (s)")
    min_reps: int = harness.option(3, "fewest timed batches per measurement")
    out: str = harness.option(harness.study_dir("bench_sharding"), "output folder")


PRESETS = {
    "full": Config(),
    "one_gpu": Config(scaling=False),
    "smoke": Config(lengths=(256,), sparsities=(0.5,), device_counts=(2,), variants=("context_all_gather",),
                    passes=("fwdbwd",), one_gpu_length=256, one_gpu_sparsity=0.5, dense_max_length=256, heads=4,
                    head_dim=16, block=16, dtype="float32", impl="reference", dense_impl="xla", target_s=0.01,
                    min_reps=1),
}


def get_config(preset: str = "full", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------- what is timed


def make_mesh(n: int, mode: str):
    axis = "heads" if mode == "heads" else "context"
    return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def input_spec(mode: str) -> P:
    return P(None, None, "heads", None) if mode == "heads" else P(None, "context", None, None)


def make_inputs(cfg: Config, length: int, mesh, mode: str):
    """q, k, v and the output cotangent do [B, L, H, D], made on the devices in their shards."""
    shape = (cfg.batch, length, cfg.heads, cfg.head_dim)
    sharded = NamedSharding(mesh, input_spec(mode))

    @functools.partial(jax.jit, out_shardings=(sharded,) * 4)
    def draw(key):
        return tuple(jax.random.normal(k, shape, jnp.dtype(cfg.dtype)) for k in jax.random.split(key, 4))

    return jax.block_until_ready(draw(jax.random.key(length)))


def ba_attention(cfg: Config, sparsity: float, mesh, variant: str | None):
    """BA-Att (q, k, v) -> out: through ``sharded_attention`` on ``mesh``, or the plain call (variant None)."""
    config = baatt.BAConfig(block_size=cfg.block, sparsity=sparsity)
    if variant is None:
        return lambda q, k, v: baatt.attention(q, k, v, config=config, implementation=cfg.impl)
    mode, exchange = VARIANTS[variant]
    return lambda q, k, v: sharding.sharded_attention(q, k, v, mesh=mesh, mode=mode, config=config,
                                                      kv_exchange=exchange, implementation=cfg.impl)


def dense_attention(cfg: Config, mesh, mode: str):
    """Dense attention under the same sharding: heads split, or queries split with K/V all-gathered."""
    attend = functools.partial(jax.nn.dot_product_attention, implementation=cfg.dense_impl)
    spec = input_spec(mode)
    if mode == "heads":
        body = attend
    else:
        def body(q, k, v):
            gather = functools.partial(jax.lax.all_gather, axis_name="context", axis=1, tiled=True)
            return attend(q, gather(k), gather(v))
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)


def with_pass(forward, pass_: str):
    """(q, k, v, do) -> out for "fwd"; -> (out, (dq, dk, dv)) for "fwdbwd" (vjp applied to do)."""
    if pass_ == "fwd":
        return lambda q, k, v, do: forward(q, k, v)

    def fwdbwd(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(do)

    return fwdbwd


def measure(cfg: Config, fn, args) -> dict:
    """Compile once; time the compiled call; read its collectives and memory. A run that does not fit
    in memory gives ``{"error": ...}`` and the grid goes on."""
    try:
        return _measure(cfg, fn, args)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"out of memory: {str(err).splitlines()[0][:200]}", flush=True)
        return dict(ms=None, received_bytes=None, collectives=None, memory_bytes=None, error="out of memory")


def _measure(cfg: Config, fn, args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    found = sharding.collectives(compiled.as_text())
    mem = compiled.memory_analysis()
    memory = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    seconds = harness.median_time(lambda: compiled(*args), target_s=cfg.target_s, min_reps=cfg.min_reps)
    return dict(ms=seconds * 1e3, received_bytes=sum(c.received_bytes for c in found), collectives=len(found),
                memory_bytes=memory)


# ----------------------------------------------------------------------------- the two parts


def run_one_gpu(cfg: Config) -> list[dict]:
    """Each variant on a one-GPU mesh against the plain baatt.attention call."""
    rows = []
    length, s = cfg.one_gpu_length, cfg.one_gpu_sparsity
    plain = {}  # pass -> measurement of the plain call (the same program for every variant)
    for variant in cfg.variants:
        mode = VARIANTS[variant][0]
        mesh = make_mesh(1, mode)
        args = make_inputs(cfg, length, mesh, mode)
        for pass_ in cfg.passes:
            if pass_ not in plain:
                plain[pass_] = measure(cfg, with_pass(ba_attention(cfg, s, mesh, None), pass_), args)
            sharded = measure(cfg, with_pass(ba_attention(cfg, s, mesh, variant), pass_), args)
            both = plain[pass_]["ms"] is not None and sharded["ms"] is not None
            row = {"part": "one_gpu", "variant": variant, "mode": mode, "L": length, "sparsity": s, "devices": 1,
                   "pass": pass_, "plain_ms": plain[pass_]["ms"], "ms": sharded["ms"],
                   "overhead": sharded["ms"] / plain[pass_]["ms"] - 1.0 if both else None,
                   "received_bytes": sharded["received_bytes"], "memory_bytes": sharded["memory_bytes"],
                   "plain_memory_bytes": plain[pass_]["memory_bytes"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del args
    return rows


def run_scaling(cfg: Config, partial_path: Path | None = None) -> list[dict]:
    rows = []
    for length in cfg.lengths:
        for n in cfg.device_counts:
            dense_done = set()  # modes whose dense baseline is timed (the same for both K/V exchanges)
            for variant in cfg.variants:
                mode = VARIANTS[variant][0]
                mesh = make_mesh(n, mode)
                args = make_inputs(cfg, length, mesh, mode)
                timed = [(variant, s, ba_attention(cfg, s, mesh, variant)) for s in cfg.sparsities]
                if cfg.dense and length <= cfg.dense_max_length and mode not in dense_done:
                    timed.append((f"dense_{mode}", None, dense_attention(cfg, mesh, mode)))
                    dense_done.add(mode)
                for name, s, forward in timed:
                    for pass_ in cfg.passes:
                        row = {"part": "scaling", "variant": name, "mode": mode, "L": length, "sparsity": s,
                               "devices": n, "pass": pass_, **measure(cfg, with_pass(forward, pass_), args)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                del args
                if partial_path:  # keep what is done if the run is cut short (removed once it completes)
                    partial_path.write_text(json.dumps(rows))
    add_efficiency(rows)
    return rows


def add_efficiency(rows: list[dict]) -> None:
    """efficiency = t(1 device) / (n * t(n devices)) of the same (variant, L, sparsity, pass); None without n = 1."""
    key = lambda r: (r["variant"], r["L"], r["sparsity"], r["pass"])
    single = {key(r): r["ms"] for r in rows if r["devices"] == 1 and r["ms"] is not None}
    for r in rows:
        base = single.get(key(r))
        r["efficiency"] = None if base is None or r["ms"] is None else base / (r["devices"] * r["ms"])


def markdown(meta: dict, rows: list[dict]) -> str:
    gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"
    num = lambda x, f: "" if x is None else format(x, f)
    ms = lambda r, key="ms": r.get("error", "") if r[key] is None else f"{r[key]:.2f}"
    percent = lambda x: "" if x is None else f"{100 * x:+.1f}%"
    lines = [f"# BA-Att across GPUs ({harness.describe_run(meta)})", ""]
    one = [r for r in rows if r["part"] == "one_gpu"]
    if one:
        lines += ["## One GPU: the sharded path against the plain call", "",
                  "| variant | L | sparsity | pass | plain ms | sharded ms | overhead |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {harness.format_length(r['L'])} | {r['sparsity']} | {r['pass']} | "
                  f"{ms(r, 'plain_ms')} | {ms(r)} | {percent(r['overhead'])} |" for r in one]
        lines.append("")
    scaling = [r for r in rows if r["part"] == "scaling"]
    if scaling:
        lines += ["## Scaling", "", "Efficiency: t(1 GPU) / (n x t(n GPUs)). Received: bytes each GPU receives "
                  "through collectives (compiled HLO). Memory: per GPU (arguments + outputs + temporaries).", "",
                  "| variant | L | sparsity | GPUs | pass | ms | efficiency | received GiB | memory GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {harness.format_length(r['L'])} | {num(r['sparsity'], '')} | {r['devices']} | "
                  f"{r['pass']} | {ms(r)} | {num(r['efficiency'], '.2f')} | {gib(r['received_bytes'])} | "
                  f"{gib(r['memory_bytes'])} |" for r in scaling]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    needed = max(cfg.device_counts) if cfg.scaling else 1
    if jax.device_count() < needed:
        raise SystemExit(f"--device-counts {cfg.device_counts} needs {needed} devices; JAX sees {jax.device_count()}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "bench_sharding_partial.json"
    rows = run_one_gpu(cfg) if cfg.one_gpu else []
    if cfg.scaling:
        rows += run_scaling(cfg, partial_path=partial)
    meta = harness.run_metadata(__spec__.name, argv, config=dataclasses.asdict(cfg), device_count=jax.device_count())
    md = markdown(meta, rows)
    harness.write_results(out, {"bench_sharding.json": dict(meta=meta, rows=rows), "bench_sharding.md": md})
    partial.unlink(missing_ok=True)
    print(md)
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
