"""Transform conformance: ``baatt.attention`` behaves like ``jax.nn.dot_product_attention`` under every transform.

For each implementation that runs here (``reference`` and ``pallas`` in interpret mode on a
CPU; ``pallas`` and ``mosaic_gpu`` on a GPU, marked ``gpu``), hypothesis draws inputs (ragged
lengths, GQA, batch > 1, key padding, bidirectional or causal) and every transform (eager, jit,
vmap, grad, jit of grad, jax.checkpoint, lax.scan over closed-over k and v, nnx.jit through
``baatt.nn.ba_attention_fn``) must give:

* with every block kept: ``jax.nn.dot_product_attention``'s output or gradients;
* with a sparse config: ``jax.nn.dot_product_attention`` masked to the selection's block pairs;
* with NaN or Inf planted at a real token: a non-finite output wherever ``jax.nn``'s dense one
  is (for NaN: exactly there), or non-finite gradients; an eager call raises instead.

Unsupported transforms (forward mode and second order through the kernels) raise errors that
name what is unsupported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import baatt


@dataclasses.dataclass(frozen=True)
class Backend:
    """An implementation and inputs it accepts: dtype, head dim, block size, and the tolerances against
    jax.nn in float32 (relative error of the whole array) of outputs and of gradients."""

    name: str
    interpret: bool
    dtype: object
    head_dim: int
    block: int
    tolerance: float
    grad_tolerance: float

    def attend(self, config):
        """f(q, k, v, key_mask) -> out, running this implementation."""
        return lambda q, k, v, m: baatt.attention(q, k, v, config=config, key_mask=m, implementation=self.name,
                                                  interpret=self.interpret)


CPU_BACKENDS = [
    pytest.param(Backend("reference", False, jnp.float32, 16, 16, 1e-5, 1e-4), id="reference"),
    pytest.param(Backend("pallas", True, jnp.float32, 64, 16, 1e-5, 1e-4), id="pallas-interpret"),
]
GPU_BACKENDS = [
    pytest.param(Backend("pallas", False, jnp.bfloat16, 64, 32, 2e-2, 5e-2), id="pallas-gpu", marks=pytest.mark.gpu),
    pytest.param(Backend("mosaic_gpu", False, jnp.bfloat16, 64, 128, 2e-2, 5e-2), id="mosaic_gpu",
                 marks=pytest.mark.gpu),
]
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
KERNEL_BACKENDS = [CPU_BACKENDS[1], *GPU_BACKENDS]

# (batch, Lq, Lk, Hq, Hkv) in units of the block size b: ragged last blocks, GQA, batch > 1, whole blocks
# (where mosaic_gpu reads the caller's layout). Few shapes, so that compiled programs are reused across examples.
SHAPES = [
    lambda b: (1, 3 * b - 5, 3 * b - 5, 2, 1),
    lambda b: (2, 2 * b + 3, 4 * b - 7, 2, 2),
    lambda b: (1, 2 * b, 2 * b, 2, 2),
]


def _loss_weights(shape):
    """Fixed weights of a linear loss: its cotangent is finite, so NaN in a gradient comes from the inputs."""
    return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)


def _grads(f):
    """Gradients in q, k and v of a linear loss of f's output."""
    def loss(q, k, v, aux):
        out = f(q, k, v, aux).astype(jnp.float32)
        return jnp.sum(out * _loss_weights(out.shape))
    return jax.grad(loss, argnums=(0, 1, 2))


def _per_example(f):
    return lambda q, k, v, m: f(q[None], k[None], v[None], None if m is None else m[None])[0]


def _scan_over_queries(f):
    """f over a stack of query sets, k and v closed over (the aux argument scanned beside q)."""
    def run(qs, k, v, ms):
        return jax.lax.scan(lambda carry, x: (carry, f(x[0], k, v, x[1])), None, (qs, ms))[1]
    return run


# Each transform maps f(q, k, v, aux) to the function whose result is compared. "scan" takes stacked q and aux.
TRANSFORMS = {
    "eager": lambda f: f,
    "jit": jax.jit,
    "vmap": lambda f: jax.vmap(_per_example(f)),
    "grad": _grads,
    "jit(grad)": lambda f: jax.jit(_grads(f)),
    "checkpoint": lambda f: _grads(jax.checkpoint(f)),
    "scan": _scan_over_queries,
}


@st.composite
def cases(draw, backend: Backend):
    """Inputs, key padding (None or a real length per batch row), a dense or sparse, bidirectional or causal
    config, and a NaN/Inf plant at a real token (for k and v: one that some query sees)."""
    batch, lq, lk, hq, hkv = draw(st.sampled_from(SHAPES))(backend.block)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    gain = lambda shape: rng.gamma(2.0, 0.5, shape[:3] + (1,))
    q, k, v = (rng.standard_normal(s) * gain(s) for s in ((batch, lq, hq, backend.head_dim),
                                                           (batch, lk, hkv, backend.head_dim),
                                                           (batch, lk, hkv, backend.head_dim)))
    lengths = draw(st.none() | st.lists(st.integers(1, lk), min_size=batch, max_size=batch))
    mask = None if lengths is None else jnp.asarray(np.arange(lk)[None] < np.asarray(lengths)[:, None])
    causal = draw(st.booleans())
    config = baatt.BAConfig(block_size=backend.block, mask="causal" if causal else "bidirectional")
    if draw(st.booleans()):
        config = config.replace(sparsity=0.5, sort_k=backend.name == "reference" and not causal)
    name = draw(st.sampled_from(["q", "k", "v"]))
    b = draw(st.integers(0, batch - 1))
    real = lq if name == "q" else min(lk if lengths is None else lengths[b], lq if causal else lk)
    at = (b, draw(st.integers(0, real - 1)), draw(st.integers(0, (hq if name == "q" else hkv) - 1)),
          draw(st.integers(0, backend.head_dim - 1)))
    plant = (name, at, draw(st.sampled_from([np.nan, np.inf, -np.inf])))
    inputs = tuple(jnp.asarray(x, backend.dtype) for x in (q, k, v))
    return inputs, mask, config, plant


def _selection_mask(selection, length_q, length_k, kv_heads):
    """bool [B, Hq, Lq, Lk]: the token pairs inside the selection's kept block pairs (any permutation)."""
    nk = -(-length_k // selection.block_k)
    kept = np.asarray(selection.kept_mask(nk))  # [B, Hq, Nq, Nk] in block space
    batch, q_heads = kept.shape[:2]
    slot = lambda perm, n: np.arange(n) if perm is None else np.argsort(np.asarray(perm), axis=-1)
    q_slot, k_slot = slot(selection.q_perm, length_q), slot(selection.k_perm, length_k)
    out = np.zeros((batch, q_heads, length_q, length_k), bool)
    for b in range(batch):
        for h in range(q_heads):
            qs = q_slot if selection.q_perm is None else q_slot[b, h]
            ks = k_slot if selection.k_perm is None else k_slot[b, h // (q_heads // kv_heads)]
            out[b, h] = kept[b, h][np.ix_(qs // selection.block_q, ks // selection.block_k)]
    return out


def _dense(q, k, v, token_mask):
    """jax.nn.dot_product_attention in float32 over a token mask [B, Hq, Lq, Lk]."""
    with jax.default_matmul_precision("float32"):
        out = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask=token_mask)
    return out.astype(q.dtype)


def _token_mask(backend, config, q, k, v, mask, *, selected: bool):
    """What jax.nn is given, [B, Hq, Lq, Lk]: the key mask and the config's causal mask, and if ``selected`` only
    the pairs of the selection that an eager call makes."""
    batch, lq, hq, _ = q.shape
    lk = k.shape[1]
    keys = np.ones((batch, lk), bool) if mask is None else np.asarray(mask)
    token = np.broadcast_to(keys[:, None, None, :], (batch, hq, lq, lk))
    if not config.mask.is_bidirectional:
        token = token & config.mask.token_mask(lq, lk)
    if not selected:
        return jnp.asarray(token)
    _, stats = baatt.attention(q, k, v, config=config, key_mask=mask, implementation=backend.name,
                               interpret=backend.interpret, return_stats=True)
    return jnp.asarray(token & _selection_mask(stats.selection, lq, lk, k.shape[2]))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _assert_close(got, want, tolerance, context):
    """Relative error of the whole array below ``tolerance``, with an absolute floor of ``tolerance / 100`` per
    element (root mean square): a gradient that jax.nn makes exactly zero (a query with one visible key has
    dq = 0) is matched by rounding-level values, which a purely relative test would call infinitely wrong."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error, scale = np.linalg.norm(got - want), np.linalg.norm(want)
    floor = tolerance / 100 * np.sqrt(max(want.size, 1))
    assert error <= tolerance * scale + floor, (
        f"relative error {error / max(scale, 1e-30):.3g} (absolute {error:.3g}) above {tolerance} "
        f"[{context}]")


def _poisoned(inputs, plant):
    name, at, value = plant
    i = "qkv".index(name)
    return tuple(x.at[at].set(value) if j == i else x for j, x in enumerate(inputs))


def _run(transform, backend, config, q, k, v, mask, *, selected: bool):
    """(ours, jax.nn's) under ``transform``; jax.nn masked to the selection's pairs if ``selected``."""
    ours = backend.attend(config)
    if transform != "scan":
        token = _token_mask(backend, config, q, k, v, mask, selected=selected)
        return TRANSFORMS[transform](ours)(q, k, v, mask), TRANSFORMS[transform](_dense)(q, k, v, token)
    # Two query sets: the given one and another; k and v closed over.
    qs = jnp.stack([q, (q * 0.5 + 0.25).astype(q.dtype)])
    masks = None if mask is None else jnp.stack([mask, mask])
    tokens = jnp.stack([_token_mask(backend, config, qi, k, v, mask, selected=selected) for qi in qs])
    return TRANSFORMS["scan"](ours)(qs, k, v, masks), TRANSFORMS["scan"](_dense)(qs, k, v, tokens)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_transform_conforms_to_jax_nn(backend, transform, data):
    (q, k, v), mask, config, plant = data.draw(cases(backend))
    gradients = transform in ("grad", "jit(grad)", "checkpoint")
    ours, want = _run(transform, backend, config, q, k, v, mask, selected=config.sparsity is not None)
    context = (f"q {q.shape} k {k.shape} key_mask lengths "
               f"{None if mask is None else np.asarray(mask).sum(-1).tolist()} {config}")
    for name, a, b in zip("qkv" if gradients else ["out"], jax.tree_util.tree_leaves(ours),
                          jax.tree_util.tree_leaves(want)):
        _assert_close(a, b, backend.grad_tolerance if gradients else backend.tolerance, f"{name}: {context}")

    # NaN/Inf at a real token reaches the output as through dense jax.nn, whatever blocks are kept.
    poisoned = _poisoned((q, k, v), plant)
    if transform == "eager":
        with pytest.raises(ValueError, match=f"{plant[0]} contains NaN or Inf"):
            backend.attend(config)(*poisoned, mask)
        return
    ours, want = _run(transform, backend, config, *poisoned, mask, selected=False)
    if gradients:
        assert not all(np.isfinite(g).all() for g in ours), "the gradients hide the planted NaN/Inf"
        return
    bad, bad_want = ~np.isfinite(ours), ~np.isfinite(want)
    assert bad.any() and bad[bad_want].all(), "an output jax.nn makes non-finite is finite"
    if np.isnan(plant[2]):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(want))


# ---- nnx.MultiHeadAttention through ba_attention_fn, under nnx.jit ------------------------------------------


def _layers(backend, config, features, heads):
    """Two MultiHeadAttention layers with the same weights: flax's attention and baatt's."""
    make = lambda attention_fn: nnx.MultiHeadAttention(
        num_heads=heads, in_features=features, qkv_features=features, decode=False, rngs=nnx.Rngs(0),
        param_dtype=jnp.float32, dtype=backend.dtype, **({} if attention_fn is None else dict(attention_fn=attention_fn)))
    ours = make(baatt.nn.ba_attention_fn(config, implementation=backend.name, interpret=backend.interpret))
    return ours, make(None)


@nnx.jit
def _apply(layer, x, mask):
    return layer(x, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 40), min_size=2, max_size=2))
def test_nnx_jit_through_ba_attention_fn(backend, seed, lengths):
    heads, length = 2, 40 if backend.block < 64 else 3 * backend.block - 7
    lengths = [min(n, length) for n in lengths]
    ours, flax_layer = _layers(backend, baatt.BAConfig(block_size=backend.block), heads * backend.head_dim, heads)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, length, heads * backend.head_dim)), backend.dtype)
    valid = jnp.asarray(np.arange(length)[None] < np.asarray(lengths)[:, None])
    mask = nnx.make_attention_mask(valid, valid)
    real = np.asarray(valid)  # padded query rows attend differently in flax (to every key); compare real ones
    for inputs in (x, x.at[1, lengths[1] - 1, 3].set(jnp.nan)):
        got, want = np.asarray(_apply(ours, inputs, mask), np.float32), np.asarray(_apply(flax_layer, inputs, mask),
                                                                                   np.float32)
        context = f"seed {seed} lengths {lengths} length {length} NaN planted {inputs is not x}"
        np.testing.assert_array_equal(np.isnan(got[real]), np.isnan(want[real]), err_msg=context)
        finite = np.isfinite(want) & real[..., None]
        # both layers run in backend.dtype
        _assert_close(got[finite], want[finite], 2 * backend.tolerance, context)


@nnx.jit(static_argnames="is_causal")
def _apply_causal(layer, x, mask, is_causal):
    return layer(x, mask=mask, is_causal=is_causal)


def test_causal_mask_is_never_dropped():
    """nnx.make_causal_mask under nnx.jit was silently dropped (bidirectional output). Now a causal mask runs
    causal attention when it is known (concrete, or is_causal=True), makes the output NaN when it cannot be
    recognised (traced, without is_causal), and any other mask that is not a key mask raises."""
    backend = CPU_BACKENDS[0].values[0]
    ours, flax_layer = _layers(backend, baatt.BAConfig(block_size=backend.block), 2 * backend.head_dim, 2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 2 * backend.head_dim)), jnp.float32)
    valid = jnp.asarray(np.arange(32)[None] < np.asarray([[32], [20]]))
    padding = nnx.make_attention_mask(valid, valid)
    causal = nnx.combine_masks(nnx.make_causal_mask(valid), padding)
    want = np.asarray(flax_layer(x, mask=causal))[np.asarray(valid)]
    close = lambda got: _rel(np.asarray(got)[np.asarray(valid)], want) < 2 * backend.tolerance
    assert close(ours(x, mask=causal))  # concrete: recognised
    assert close(_apply_causal(ours, x, padding, True)) and close(_apply_causal(ours, x, causal, True))
    assert np.isnan(_apply(ours, x, causal)).all()  # traced, no is_causal: NaN, never bidirectional
    assert np.isfinite(_apply(ours, x, padding)).all()
    banded = nnx.make_attention_mask(jnp.arange(32), jnp.arange(32), lambda i, j: abs(i - j) < 4)
    with pytest.raises(ValueError, match="key-padding masks, alone or with causal attention"):
        ours(x, mask=banded)


# ---- refusals and what the reference supports beyond them ----------------------------------------------------


def _small(backend, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((1, 2 * backend.block, 2, backend.head_dim), (1, 2 * backend.block, 1, backend.head_dim))
    q, k = (jnp.asarray(rng.standard_normal(s), backend.dtype) for s in shapes)
    return q, k, jnp.asarray(rng.standard_normal(shapes[1]), backend.dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_refuse_forward_mode_and_second_order(backend):
    q, k, v = _small(backend)
    attend = backend.attend(baatt.BAConfig(block_size=backend.block))
    loss = lambda q: jnp.sum(attend(q, k, v, None).astype(jnp.float32) ** 2)
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(lambda q: attend(q, k, v, None), (q,), (q,))
    second_order = f"second-order derivatives .* not supported by implementation '{backend.name}'.*'reference'"
    for what in (jax.grad(lambda q: jnp.sum(jax.grad(loss)(q))), jax.hessian(loss),
                 lambda q: jax.jvp(jax.grad(loss), (q,), (q,))):
        with pytest.raises(NotImplementedError, match=second_order):
            what(q)


def test_reference_supports_forward_mode_and_second_order():
    backend = CPU_BACKENDS[0].values[0]
    q, k, v = _small(backend, seed=1)
    attend = backend.attend(baatt.BAConfig(block_size=backend.block))
    dense = lambda q: jax.nn.dot_product_attention(q, k, v)
    _, tangent = jax.jvp(lambda q: attend(q, k, v, None), (q,), (q,))
    assert _rel(tangent, jax.jvp(dense, (q,), (q,))[1]) < 1e-5
    second = lambda f: jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(f(q) ** 2))(q) ** 2))(q)
    assert _rel(second(lambda q: attend(q, k, v, None)), second(dense)) < 1e-4
