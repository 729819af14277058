"""python -m experiments.train_step_time --preset gpu_passkey_fast

Where a training step's time goes: the jitted step alone vs the host-side batch builder.
For every (seq_len, batch) stage of a train preset: compile time and mean time
of the jitted train step on a fixed real batch (device time only, synchronised),
mean time of ``make_batch`` (packed text + task examples, host CPU), and the
tokens/s each of them allows. A training run is limited by the slower of the
two (batches are built in a background thread, or in ``TrainConfig.batch_workers``
processes: "all builders tok/s" is one builder's rate times their number). Variants: the preset's
``head_positions`` and the full head; for the preset's head also the model forward,
the loss gradient (no optimiser) and one dense attention layer alone (on ``baatt.synthetic`` inputs).
Writes ``train_step_time_<preset>.json`` under ``--out`` (default ``experiments/results/train_step_time/``).

``--profile DIR``: also trace a few steps of every stage with ``jax.profiler`` and
write, per stage, the device ops that take the most time per step (from the
trace's device timeline; op names match the step's optimised HLO, saved beside
it), so the step's time is attributed to ops rather than guessed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baatt.data import corpus
from baatt.data.batches import make_batch
from baatt.data.tokenizer import get_tokenizer
from baatt.nn import DiffusionLM
from baatt.train import build_step, make_optimizer
from experiments import harness, train_dlm


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = harness.option("gpu_passkey_fast", "train preset (experiments.train_dlm)",
                                 choices=tuple(train_dlm.PRESETS))
    iters: int = harness.option(20, "timed train steps per stage (and fewest timed batches of the breakdown)")
    batches: int = harness.option(10, "make_batch calls timed per stage")
    stages: tuple[int, ...] | None = harness.option(None, "indices of the preset's stages to run (none: all)")
    profile: str | None = harness.option(
        None, "also trace each stage's step and write its top device ops (and optimised HLO) under this folder")
    out: str = harness.option(harness.study_dir("train_step_time"), "output folder")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def device_op_times(trace_dir: str, steps: int, top: int = 25) -> list[dict]:
    """Per-op device time per step from the perfetto trace that ``jax.profiler.trace`` wrote under ``trace_dir``.

    Sums complete events of device processes (``/device:...``; on a CPU backend every process) by
    (thread, name), divided by ``steps``.
    """
    import glob
    import gzip

    paths = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(paths[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {p for p, n in procs.items() if n.startswith("/device")} or set(procs)  # CPU: the host timeline
    totals: dict = {}
    for e in events:
        if e.get("ph") != "X" or e["pid"] not in device:
            continue
        k = (threads.get((e["pid"], e.get("tid")), "?"), e["name"])
        n, d = totals.get(k, (0, 0.0))
        totals[k] = (n + 1, d + float(e.get("dur", 0.0)))
    rows = [dict(thread=t, name=nm, calls_per_step=n / steps, ms_per_step=d / 1e3 / steps)
            for (t, nm), (n, d) in totals.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    by_thread: dict = {}
    for r in rows:
        by_thread.setdefault(r["thread"], []).append(r)
    out = []
    for t, rs in by_thread.items():
        out.append(dict(thread=t, name="<all>", calls_per_step=sum(r["calls_per_step"] for r in rs),
                        ms_per_step=sum(r["ms_per_step"] for r in rs)))
        out += rs[:top]
    return out


def _fresh_step(cfg, toks, elig, head_positions):
    """A freshly initialised model's jitted train step and its arguments (params, opt state, batch, key)."""
    model = DiffusionLM(cfg.model_config(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg)
    step = build_step(graphdef, tx, model.cfg.mask_id, cfg.eps, cfg.full_task_answers, head_positions)
    return step, params, tx.init(params), jnp.asarray(toks), jnp.asarray(elig), jax.random.PRNGKey(0)


def profile_step(cfg, toks, elig, head_positions, out_dir: Path, tag: str, steps: int = 5) -> list[dict]:
    """Trace ``steps`` train steps after warm-up; write the step's optimised HLO and return device op times."""
    step, params, opt_state, toks, elig, key = _fresh_step(cfg, toks, elig, head_positions)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"hlo_{tag}.txt").write_text(step.lower(params, opt_state, toks, elig, key).compile().as_text())
    for _ in range(3):
        params, opt_state, m = step(params, opt_state, toks, elig, key)
    jax.block_until_ready(m)
    trace_dir = out_dir / f"trace_{tag}"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            params, opt_state, m = step(params, opt_state, toks, elig, key)
        jax.block_until_ready(m)
    return device_op_times(str(trace_dir), steps)


def time_step(cfg, seq_len, batch, toks, elig, iters, head_positions):
    step, params, opt_state, toks, elig, key = _fresh_step(cfg, toks, elig, head_positions)
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, toks, elig, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        params, opt_state, m = step(params, opt_state, toks, elig, key)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(iters):
        params, opt_state, m = step(params, opt_state, toks, elig, key)
    jax.block_until_ready(m)
    return compile_s, (time.perf_counter() - t0) / iters


def _timeit(f, *args, iters):
    """Median seconds of ``f(*args)`` (the benchmarks' timing loop), at least ``iters`` timed batches."""
    return harness.median_time(lambda: f(*args), target_s=0.3, min_reps=iters)


def breakdown(cfg, toks, iters):
    """ms of: model forward (hidden states), forward + backward of the loss, one dense attention layer fwd / fwd+bwd."""
    from baatt.diffusion.masking import diffusion_loss_gathered
    from baatt.nn.attention import dense_attention

    model = DiffusionLM(cfg.model_config(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    mc = model.cfg
    toks = jnp.asarray(toks)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p).hidden(x))

    def loss(p, x, key):
        m = nnx.merge(graphdef, p)
        return diffusion_loss_gathered(m.hidden, m.logits, key, x, mask_id=mc.mask_id,
                                       head_positions=cfg.head_positions)[0]

    grad = jax.jit(jax.grad(loss))
    b, l = toks.shape
    q, k, v = harness.synthetic_inputs(l, batch=b, heads=mc.num_heads, kv_heads=mc.num_kv_heads,
                                       head_dim=mc.head_dim, dtype=mc.compute_dtype)
    att = jax.jit(dense_attention)
    att_g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dense_attention(q, k, v).astype(jnp.float32))))
    return dict(forward_ms=1e3 * _timeit(fwd, params, toks, iters=iters),
                loss_grad_ms=1e3 * _timeit(grad, params, toks, jax.random.PRNGKey(0), iters=iters),
                attn_layer_fwd_ms=1e3 * _timeit(att, q, k, v, iters=iters),
                attn_layer_fwd_bwd_ms=1e3 * _timeit(att_g, q, k, v, iters=iters))


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    train_cfg = train_dlm.get_config(cfg.preset).train
    tok, stream = get_tokenizer(), corpus.load_tokens("train")
    rng = np.random.default_rng(0)
    rows, profiles = [], {}
    stages = [s for i, s in enumerate(train_cfg.stages) if cfg.stages is None or i in cfg.stages]
    for stage in stages:
        seq_len, batch = stage[1], stage[2]
        batch_kw = train_cfg.batch_kwargs(train_cfg.stage_task_fraction(stage))
        make_batch(rng, stream, tok, seq_len, batch, **batch_kw)
        t0 = time.perf_counter()
        for _ in range(cfg.batches):
            toks, elig = make_batch(rng, stream, tok, seq_len, batch, **batch_kw)
        batch_s = (time.perf_counter() - t0) / cfg.batches
        variants = {"preset": train_cfg.head_positions}
        if train_cfg.head_positions is not None:
            variants["full_head"] = None
        for name, hp in variants.items():
            compile_s, step_s = time_step(train_cfg, seq_len, batch, toks, elig, cfg.iters, hp)
            row = dict(seq_len=seq_len, batch=batch, head=name, head_positions=hp, compile_s=compile_s,
                       step_ms=1e3 * step_s, batch_ms=1e3 * batch_s, step_tok_s=seq_len * batch / step_s,
                       batch_tok_s=seq_len * batch / batch_s, builders=max(1, train_cfg.batch_workers),
                       builders_tok_s=max(1, train_cfg.batch_workers) * seq_len * batch / batch_s)
            if name == "preset":
                row.update(breakdown(train_cfg, toks, cfg.iters))
                if cfg.profile:
                    tag = f"{seq_len}x{batch}"
                    profiles[tag] = profile_step(train_cfg, toks, elig, hp, Path(cfg.profile), tag)
                    for r in profiles[tag][:40]:
                        print(f"  [{tag}] {r['ms_per_step']:8.3f} ms {r['calls_per_step']:6.1f}x  {r['thread'][:24]:24s} {r['name'][:90]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = dict(harness.run_metadata(__spec__.name, argv), preset=cfg.preset, config=dataclasses.asdict(train_cfg),
               rows=rows)
    if profiles:
        out["device_ops"] = profiles
    harness.write_results(cfg.out, {f"train_step_time_{cfg.preset}.json": out})
    print("| L | batch | head | compile s | step ms | step tok/s | batch-builder ms | builder tok/s | builders | all builders tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['batch']} | {r['head']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r['step_tok_s']:,.0f} | {r['batch_ms']:.1f} | {r['batch_tok_s']:,.0f} | {r['builders']} | "
              f"{r['builders_tok_s']:,.0f} |")
    return out


if __name__ == "__main__":
    main()
