"""baatt.sharding: head and context parallelism on 8 host CPU devices, equal to one device.

The number of CPU devices is fixed when JAX starts, and the rest of the suite has started it
with one, so the multi-device checks run in a child process (``python -m tests.test_sharding``,
with ``JAX_NUM_CPU_DEVICES=8``) that runs every function of ``CHECKS`` and prints what each
raised, if anything, as JSON; each ``test_multi_device[...]`` asserts on one of them. The
checks compare outputs and gradients with a single-device ``baatt.attention`` on the same
inputs (meshes 1x8, 2x4 and 8x1), and read the communication from the compiled HLO: none in
mode "heads", block statistics plus K/V (never more than K/V per collective) in mode "context".
Argument errors and the HLO parser run here, on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import baatt
from baatt import sharding
from tests.conftest import in_background

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
TOL = dict(rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- inputs and references


def inputs(batch, length, q_heads, kv_heads, head_dim, lengths, seed=0):
    """q, k, v (float32, heavy-tailed norms) and a key mask keeping the first ``lengths[b]`` keys of row b."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, q_heads, head_dim)) * rng.gamma(2.0, 0.5, (batch, length, q_heads, 1))
    k = rng.standard_normal((batch, length, kv_heads, head_dim)) * rng.gamma(2.0, 0.5, (batch, length, kv_heads, 1))
    v = rng.standard_normal((batch, length, kv_heads, head_dim))
    key_mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v)) + (jnp.asarray(key_mask),)


def mesh_of(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=jax.devices()[: int(np.prod(shape))])


def forward_and_grads(attend):
    """jit of (q, k, v, key_mask) -> (out, selection parts, grads of a fixed nonlinear loss)."""

    def run(q, k, v, key_mask):
        def loss(q, k, v):
            out, stats = attend(q, k, v, key_mask)
            return jnp.sum(jnp.sin(out) * out), (out, stats)

        (_, (out, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, stats["lse"], stats["selection"], grads

    return jax.jit(run)


def single_device(config, **kw):
    return forward_and_grads(lambda q, k, v, m: baatt.attention(q, k, v, config=config, key_mask=m,
                                                                return_stats=True, **kw))


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=what, **TOL)


def compare(got, want, *, same_selection=True):
    out, lse, sel, grads = got
    out1, lse1, sel1, grads1 = want
    assert_close(out, out1, "out")
    assert_close(lse, lse1, "lse")
    for name, g, g1 in zip("qkv", grads, grads1):
        assert_close(g, g1, f"d{name}")
    if same_selection:
        np.testing.assert_array_equal(np.asarray(sel.counts), np.asarray(sel1.counts))
        live = np.arange(sel.kmax) < np.asarray(sel.counts)[..., None]
        np.testing.assert_array_equal(np.where(live, sel.indices, -1), np.where(live, sel1.indices, -1))


def run_and_read_collectives(fn, *args):
    """(fn(*args), the collectives of its compiled program), compiling once."""
    compiled = fn.lower(*args).compile()
    return compiled(*args), sharding.collectives(compiled.as_text())


# ----------------------------------------------------------------------------- the multi-device checks

HEADS_CFG = baatt.BAConfig(block_size=16, sparsity=0.5, sort_q=True, sort_k=True, force_sink=True)
CONTEXT_CFG = baatt.BAConfig(block_size=16, sparsity=0.75, compensate=True, force_sink=True, local_window=1)
SORTED_CONTEXT_CFG = baatt.BAConfig(block_size=16, sparsity=0.75, sort_q=True, sort_k=True, force_sink=True)
MESHES = ((1, 8), (2, 4), (8, 1))  # (data or heads, heads or context)


def check_heads_mode():
    """Batch over the first mesh axis, heads over the second; GQA, ragged length, padding, sorting."""
    q, k, v, mask = inputs(8, 100, 16, 8, 16, lengths=[100, 90, 77, 100, 64, 100, 33, 95])
    want = single_device(HEADS_CFG)(q, k, v, mask)
    report = {}
    for shape in MESHES:
        mesh = mesh_of(shape, ("data", "heads"))
        run = forward_and_grads(lambda q, k, v, m, mesh=mesh: sharding.sharded_attention(
            q, k, v, mesh=mesh, mode="heads", config=HEADS_CFG, key_mask=m, batch_axis="data", return_stats=True))
        got, found = run_and_read_collectives(run, q, k, v, mask)
        compare(got, want)
        assert not found, f"mode 'heads' on {shape} communicates: {found}"
        report[str(shape)] = "no collectives"
    return report


def check_context_all_gather():
    """Sequence over the second axis: the same selection as one device, only statistics and K/V gathered."""
    batch, length, kv_heads, head_dim, block = 8, 256, 2, 16, 16
    q, k, v, mask = inputs(batch, length, 4, kv_heads, head_dim, lengths=[256, 250, 200, 256, 130, 256, 17, 240])
    want = single_device(CONTEXT_CFG)(q, k, v, mask)
    report = {}
    for shape in MESHES:
        mesh = mesh_of(shape, ("data", "context"))
        run = forward_and_grads(lambda q, k, v, m, mesh=mesh: sharding.sharded_attention(
            q, k, v, mesh=mesh, mode="context", config=CONTEXT_CFG, key_mask=m, batch_axis="data",
            return_stats=True))
        got, found = run_and_read_collectives(run, q, k, v, mask)
        compare(got, want)
        # K (or V, dK, dV) of the local batch rows over the whole sequence, float32.
        kv_bytes = batch // shape[0] * length * kv_heads * head_dim * 4
        sizes = [c.payload_bytes for c in found]
        assert max(sizes, default=0) <= kv_bytes, f"a collective moves more than K: {found}"
        small = sum(s for s in sizes if s < kv_bytes)  # block statistics (mean, variance, count) and the key mask
        assert small <= 2.5 * kv_bytes / block, f"statistics gathers exceed ~2/block_size of K: {small} B; {found}"
        if shape[1] > 1:
            assert sum(s == kv_bytes for s in sizes) >= 2, f"K and V should be gathered: {found}"
        report[str(shape)] = dict(kv_bytes=kv_bytes, statistics_bytes=small, collectives=len(found))
    return report


def check_context_ring():
    """The ring: within-shard sorting, padding; equal to one device on the selection it made."""
    q, k, v, mask = inputs(8, 256, 4, 2, 16, lengths=[256, 250, 200, 256, 130, 256, 17, 240], seed=1)
    report = {}
    for shape in MESHES[1:2]:  # four steps round the ring (eight on 1x8 take twice as long to compile)
        mesh = mesh_of(shape, ("data", "context"))
        run = forward_and_grads(lambda q, k, v, m, mesh=mesh: sharding.sharded_attention(
            q, k, v, mesh=mesh, mode="context", config=SORTED_CONTEXT_CFG, key_mask=m, batch_axis="data",
            kv_exchange="ring", return_stats=True))
        got, found = run_and_read_collectives(run, q, k, v, mask)
        sel = got[2]
        shard_len = 256 // shape[1]
        positions = np.arange(256) // shard_len
        assert np.all(np.asarray(sel.q_perm) // shard_len == positions), "q_perm leaves its shard"
        assert np.all(np.asarray(sel.k_perm) // shard_len == positions), "k_perm leaves its shard"
        want = single_device(SORTED_CONTEXT_CFG, selection=sel)(q, k, v, mask)
        compare(got, want)
        permutes = [c for c in found if c.kind == "collective-permute"]
        shard_bytes = 8 // shape[0] * shard_len * 2 * 16 * 4
        assert permutes and all(c.payload_bytes <= shard_bytes for c in permutes), found
        report[str(shape)] = dict(permutes=len(permutes), shard_bytes=shard_bytes)
    return report


def check_ring_skips_unneeded_shards():
    """A selection that keeps only blocks of each query's own shard: the ring never passes K/V on, and
    NaN inputs still poison what they poison on one device."""
    q, k, v, mask = inputs(2, 256, 4, 2, 16, lengths=[256, 256], seed=2)
    mesh = mesh_of((2, 4), ("data", "context"))
    nq = 16
    own = (np.arange(nq) // 4) * 4  # first block of the query block's own shard
    indices = np.stack([own, own + 1, own + 3], axis=-1)  # three blocks of that shard
    indices = jnp.asarray(np.broadcast_to(indices, (2, 4, nq, 3)), jnp.int32)
    counts = jnp.asarray(np.broadcast_to(np.array([1, 2, 3, 3] * 4), (2, 4, nq)), jnp.int32)
    sel = baatt.BlockSelection(indices, counts, block_q=16, block_k=16)
    # NaN in one key of the last shard and one value of the first: baatt.attention's rule poisons every row
    # of the heads they serve, also on devices that never receive those shards.
    k = k.at[1, 250, 0, 3].set(jnp.nan)
    v = v.at[0, 5, 1, 7].set(jnp.nan)
    ring = jax.jit(lambda q, k, v: sharding.sharded_attention(
        q, k, v, mesh=mesh, mode="context", selection=sel, batch_axis="data", kv_exchange="ring"))
    got, want = ring(q, k, v), jax.jit(lambda q, k, v: baatt.attention(q, k, v, selection=sel))(q, k, v)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()
    assert_close(np.nan_to_num(got), np.nan_to_num(want), "out")
    return "equal"


def check_pallas_kernel_per_shard():
    """The Pallas kernel (interpret mode) runs per shard, here behind the statistics and K/V gathers of
    mode "context" (forward; the gradient plumbing is the same as the reference's, checked above)."""
    q, k, v, mask = inputs(2, 128, 4, 2, 64, lengths=[128, 100], seed=3)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5)
    mesh = mesh_of((2, 2), ("data", "context"))
    out, stats = sharding.sharded_attention(q, k, v, mesh=mesh, mode="context", config=cfg, key_mask=mask,
                                            batch_axis="data", implementation="pallas", interpret=True,
                                            return_stats=True)
    assert stats["implementation"] == "pallas", stats["implementation"]
    assert_close(out, baatt.attention(q, k, v, config=cfg, key_mask=mask), "out")
    return stats["implementation"]


def check_registry_head_parallel():
    """register_head_parallel behind baatt.attention: equal to one device, and only the per-(batch, head)
    bookkeeping of baatt.attention's NaN rules crosses devices (no sequence-sized data)."""
    q, k, v, mask = inputs(4, 64, 4, 2, 16, lengths=[64, 50, 64, 20], seed=5)
    mesh = mesh_of((2, 2), ("data", "heads"))
    names = sharding.register_head_parallel(mesh, batch_axis="data", head_axis="heads", implementation="reference")
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, compensate=True)
    attend = jax.jit(lambda q, k, v, m: baatt.attention(q, k, v, config=cfg, key_mask=m, implementation=names))
    out, found = run_and_read_collectives(attend, q, k, v, mask)
    assert_close(out, baatt.attention(q, k, v, config=cfg, key_mask=mask), "out")
    # At most one value per (batch row, head, channel), whatever the length.
    assert all(c.payload_bytes <= 4 * 4 * 16 * 4 for c in found), f"sequence-sized collectives: {found}"
    return names


def check_dlm_train_step_and_sampling():
    """The tiny DLM, same model code: a training step data- and head-parallel on a 2x2 mesh (params
    replicated, batch over "data", attention heads over "heads") equals the one-device step; the
    sampler gives the same tokens."""
    import optax
    from flax import nnx

    from baatt.diffusion.sampler import generate
    from baatt.nn import AttentionPlan, DiffusionLM, get_config
    from baatt.train import build_step

    mesh = mesh_of((2, 2), ("data", "heads"))
    names = sharding.register_head_parallel(mesh, batch_axis="data", head_axis="heads", implementation="reference")
    assert all(name in baatt.implementations() for name in names)
    mcfg = get_config("tiny", vocab_size=512, mask_id=511, max_len=64, num_layers=1)
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5)
    model = lambda impl: DiffusionLM(mcfg, attention=AttentionPlan.ba(cfg, implementation=impl), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 500)
    eligible = jnp.ones((4, 64), bool)
    tx = optax.sgd(1.0)  # new params = params - grads: the step's gradients compared exactly
    results = {}
    for impl in ("reference", names):
        graphdef, params = nnx.split(model(impl))
        args = (tokens, eligible)
        if impl is names:
            params = jax.device_put(params, NamedSharding(mesh, P()))
            args = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args)
        step = build_step(graphdef, tx, mcfg.mask_id, 1e-3)
        new, _, metrics = step(params, tx.init(params), *args, jax.random.key(4))
        results[impl] = jax.device_get((new, metrics))
    (p1, m1), (p2, m2) = results["reference"], results[names]
    assert_close(m2["loss"], m1["loss"], "loss")
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg="params after one SGD step")
    canvas = np.array(tokens[:2])
    canvas[:, 32:] = mcfg.mask_id
    one = generate(model("reference"), canvas, steps=2)
    many = generate(model(names), canvas, steps=2)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    assert many.step_density == one.step_density
    return dict(loss=float(m2["loss"]), densities=many.step_density)


def check_bench_smoke():
    """experiments/bench_sharding.py in its CPU smoke mode."""
    from experiments import bench_sharding

    with tempfile.TemporaryDirectory() as out:
        result = bench_sharding.main(["--preset", "smoke", "--out", out])
        written = sorted(p.name for p in Path(out).iterdir())
    rows = result["rows"]
    assert rows and written == ["bench_sharding.json", "bench_sharding.md"], written
    return dict(rows=len(rows), modes=sorted({r["mode"] for r in rows}))


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
    check_heads_mode, check_context_all_gather, check_context_ring, check_ring_skips_unneeded_shards,
    check_pallas_kernel_per_shard, check_registry_head_parallel, check_dlm_train_step_and_sampling,
    check_bench_smoke)}


def run_checks() -> dict:
    """Every check, each caught on its own: name -> {"result"} or {"error": traceback}."""
    if jax.device_count() != DEVICES:
        raise RuntimeError(f"the checks need {DEVICES} devices (JAX_NUM_CPU_DEVICES={DEVICES}); "
                           f"JAX sees {jax.device_count()}")
    report = {}
    for name, check in CHECKS.items():
        try:
            report[name] = {"result": check()}
        except Exception:  # reported to the parent test, which fails with it
            report[name] = {"error": traceback.format_exc()}
    return report


def child_job():
    """A function that runs the child (``run_checks``) and returns its CompletedProcess (the environment taken now)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(DEVICES))
    return functools.partial(subprocess.run, [sys.executable, "-m", "tests.test_sharding"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)


def start_in_background(items):
    """Called once collection is done (tests/conftest.py): the child runs beside the tests before these."""
    if any(item.originalname == "test_multi_device" for item in items):
        in_background("test_sharding", child_job())


@functools.cache
def multi_device_report() -> dict:
    done = in_background("test_sharding", child_job()).result()
    assert done.returncode == 0, f"the multi-device child failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_multi_device(name):
    outcome = multi_device_report()[name]
    assert "error" not in outcome, outcome.get("error")


# ----------------------------------------------------------------------------- one device


def test_one_device_mesh_equals_unsharded_call():
    q, k, v, mask = inputs(2, 64, 4, 2, 16, lengths=[64, 50])
    cfg = baatt.BAConfig(block_size=16, sparsity=0.5, compensate=True)
    mesh = mesh_of((1, 1), ("heads", "context"))
    cases = [(mode, cfg) for mode in sharding.MODES] + [("heads", cfg.replace(mask="causal", tail="pooled"))]
    for mode, config in cases:
        want = baatt.attention(q, k, v, config=config, key_mask=mask)
        out, stats = sharding.sharded_attention(q, k, v, mesh=mesh, mode=mode, config=config, key_mask=mask,
                                                head_axis="heads", return_stats=True)
        assert_close(out, want, f"{mode}, mask {config.mask.describe()}")
        assert stats["implementation"] == "reference" and stats["density"].shape == (2, 4)
        assert stats["selection"].mask == config.mask


def test_errors_name_the_argument_and_the_rule():
    q, k, v, _ = inputs(2, 64, 4, 2, 16, lengths=[64, 64])
    mesh = mesh_of((1, 1), ("heads", "context"))
    call = functools.partial(sharding.sharded_attention, q, k, v, mesh=mesh)
    cfg = baatt.BAConfig(block_size=16)
    cases = [
        (dict(mode="rows"), "mode must be one of"),
        (dict(mode="heads", head_axis="model"), "head_axis must name axes of the mesh"),
        (dict(mode="heads", batch_axis="heads"), "head_axis and batch_axis both use mesh axis 'heads'"),
        (dict(mode="heads", kv_exchange="ring"), "apply to mode='context' only"),
        (dict(mode="context", kv_exchange="tree"), "kv_exchange must be one of"),
        (dict(mode="context", config=cfg.replace(selector="oracle")), "config.selector must be one of"),
        (dict(mode="context", config=baatt.BAConfig(block_size=128)), "must be a multiple of"),
        (dict(mode="context", config=cfg.replace(mask="causal")), "the mask must be bidirectional"),
        (dict(mode="context", config=cfg.replace(guard_recall=0.9)), "guard_recall must be None"),
        (dict(mode="context", config=cfg.replace(tail="pooled"), kv_exchange="ring"), "needs kv_exchange='all_gather'"),
        (dict(mode="heads", mesh="cpu"), "mesh must be a jax.sharding.Mesh"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**{"config": cfg, **kwargs})
    with pytest.raises(ValueError, match="must be divisible by the 2 shards"):
        sharding._check_divides("the number of kv heads", 3, 2, "head_axis", "heads")


def test_bench_has_a_config_on_the_command_line(capsys):
    from experiments import bench_sharding

    assert bench_sharding.__doc__.startswith("python -m experiments.bench_sharding")
    cfg = bench_sharding.get_config()
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    with pytest.raises(SystemExit) as exc:
        bench_sharding.main(["--preset", "one_gpu", "--lengths", "1024", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and printed["scaling"] is False and printed["lengths"] == [1024]
    assert printed["out"] == "experiments/results/bench_sharding"


HLO = """
  %all-gather.1 = f32[2,256,4,16]{3,2,1,0} all-gather(%p0), channel_id=1, replica_groups=mesh['data'=2,'context'=4] {'context'}, dimensions={1}
  %ag-start = (bf16[1,64,8,128]{3,2,1,0}, bf16[1,256,8,128]{3,2,1,0}) all-gather-start(%p1), replica_groups=[2,4]<=[8], dimensions={1}
  %ag-done = bf16[1,256,8,128]{3,2,1,0} all-gather-done(%ag-start)
  %cp-start = (f32[1,64,2,16]{3,2,1,0}, f32[1,64,2,16]{3,2,1,0}, u32[], u32[]) collective-permute-start(%p2), source_target_pairs={{0,1},{1,0}}
  %ar = f32[10]{0} all-reduce(%p3), replica_groups={{0,1},{2,3}}, to_apply=%sum
  %rs = f32[4]{0} reduce-scatter(%p4), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%sum
  %fusion = f32[4]{0} fusion(%p5), kind=kLoop, metadata={op_name="all_gather"}
"""


def test_collectives_parser():
    found = sharding.collectives(HLO)
    assert [c.kind for c in found] == ["all-gather", "all-gather", "collective-permute", "all-reduce",
                                       "reduce-scatter"]
    gather, async_gather, permute, reduce, scatter = found
    assert gather.arrays == (("f32", (2, 256, 4, 16)),) and gather.group_size == 4
    assert gather.received_bytes == 3 / 4 * gather.result_bytes
    assert async_gather.arrays == (("bf16", (1, 256, 8, 128)),) and async_gather.group_size == 4
    assert permute.payload_bytes == 64 * 2 * 16 * 4 and permute.received_bytes == permute.payload_bytes
    assert reduce.group_size == 2 and reduce.received_bytes == 40.0
    assert scatter.payload_bytes == 64 and scatter.received_bytes == 48.0


@pytest.mark.gpu
def test_gpu_kernels_per_shard():
    """The best GPU implementation per shard over every visible GPU, each mode and K/V exchange, against
    one call of the same implementation on the selection the sharded call made."""
    n = len(jax.devices())
    q, k, v, _ = inputs(1, 1024 * n, 4 * n, 2 * n, 128, lengths=[1024 * n], seed=4)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    cfg = baatt.BAConfig(block_size=128, sparsity=0.5)
    for mode, exchange in (("heads", None), ("context", "all_gather"), ("context", "ring")):
        mesh = jax.make_mesh((n,), (mode,) if mode == "heads" else ("context",))
        out, stats = sharding.sharded_attention(q, k, v, mesh=mesh, mode=mode, config=cfg, kv_exchange=exchange,
                                                return_stats=True)
        assert stats["implementation"] != "reference", stats["implementation"]
        want = baatt.attention(q, k, v, selection=jax.device_get(stats["selection"]),
                               implementation=stats["implementation"])
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=2e-2,
                                   err_msg=f"{mode} {exchange}")


if __name__ == "__main__":
    print(json.dumps(run_checks(), default=str))
