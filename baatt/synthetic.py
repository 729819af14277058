"""Synthetic attention inputs with the structure real long-context attention has.

Used where no model is at hand (the approximation-error study, tests, benchmarks).
Each ingredient stands for a known property of pretrained attention:
- segments (documents or scenes) with their own topic vector: block structure;
- a slowly drifting content state with rotary embeddings: a local band;
- heavy-tailed token norms (log-normal): what norm sorting reacts to;
- a few sink keys of large norm aligned with a shared query direction.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    batch: int = 1
    length: int = 8192
    q_heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    mean_segment: int = 600  # tokens per topic segment, on average
    topic_strength: float = 2.0
    drift: float = 0.97  # AR(1) coefficient of the content state (higher = smoother = stronger local band)
    norm_sigma: float = 0.5  # log-normal sigma of token norms (heavy tail)
    num_sinks: int = 4
    sink_strength: float = 3.0
    rope_base: float = 10_000.0
    seed: int = 0


def rope(x, base: float):
    """Rotary embedding over adjacent channel pairs, positions along axis 1 of [B, L, H, D].

    ``x`` is a NumPy array (host draw) or a jax array (device draw); the angles are computed in
    float64 on the host either way and the result has ``x``'s type and dtype.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    d = x.shape[-1]
    ang = np.arange(x.shape[1])[:, None] * (base ** (-np.arange(0, d, 2) / d))[None, :]  # [L, D/2]
    cos, sin = (xp.asarray(f(ang)[None, :, None, :], dtype=x.dtype) for f in (np.cos, np.sin))
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return xp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def attention_inputs(cfg: SyntheticConfig = SyntheticConfig(), dtype=jnp.float32):
    """Returns q [B, L, Hq, D], k and v [B, L, Hkv, D] as jax arrays (float32 unless ``dtype``)."""
    if cfg.q_heads % cfg.kv_heads:
        raise ValueError(f"kv_heads must divide q_heads; got {cfg.kv_heads} and {cfg.q_heads}")
    rng = np.random.default_rng(cfg.seed)
    b, l, d = cfg.batch, cfg.length, cfg.head_dim
    hq, hkv = cfg.q_heads, cfg.kv_heads
    # Segments of random length, each with a topic per head.
    seg_id = np.zeros((b, l), np.int64)
    for bi in range(b):
        cuts = np.cumsum(rng.geometric(1.0 / cfg.mean_segment, size=l // 50 + 2))
        seg_id[bi] = np.searchsorted(cuts, np.arange(l), side="right")
    n_seg = seg_id.max() + 1
    topics = rng.standard_normal((b, n_seg, hkv, d)) / np.sqrt(d)
    topic = np.take_along_axis(topics, seg_id[:, :, None, None], axis=1)  # [B, L, Hkv, D]
    # Smooth content state: AR(1) along positions.
    noise = rng.standard_normal((b, l, hkv, d)) / np.sqrt(d)
    state = np.empty_like(noise)
    state[:, 0] = noise[:, 0]
    a = cfg.drift
    for i in range(1, l):
        state[:, i] = a * state[:, i - 1] + np.sqrt(1 - a * a) * noise[:, i]
    wq = rng.standard_normal((hq, d, d)) / np.sqrt(d)
    wk = rng.standard_normal((hkv, d, d)) / np.sqrt(d)
    group = hq // hkv
    content_k = cfg.topic_strength * topic + state
    content_q = np.repeat(content_k, group, axis=2)
    # Queries read the same content through a per-head map close to the key map (q ~ k up to a rotation).
    wq = 0.6 * np.repeat(wk, group, axis=0) + 0.8 * wq
    q = np.einsum("blhd,hde->blhe", content_q, wq, optimize=True) * np.sqrt(d) * 0.5
    k = np.einsum("blhd,hde->blhe", content_k, wk, optimize=True) * np.sqrt(d) * 0.5
    q += 0.3 * rng.standard_normal(q.shape)
    k += 0.3 * rng.standard_normal(k.shape)
    # Heavy-tailed norms.
    q *= rng.lognormal(0.0, cfg.norm_sigma, (b, l, hq, 1))
    k *= rng.lognormal(0.0, cfg.norm_sigma, (b, l, hkv, 1))
    # Sinks: a few keys (token 0 and random others) of large norm along a direction every query shares.
    shared = rng.standard_normal((hkv, d))
    shared /= np.linalg.norm(shared, axis=-1, keepdims=True)
    sinks = np.concatenate([[0], rng.choice(np.arange(1, l), size=max(cfg.num_sinks - 1, 0), replace=False)])
    k[:, sinks] = cfg.sink_strength * np.sqrt(d) * shared[None, None] + 0.1 * k[:, sinks]
    q += 0.5 * np.repeat(shared, group, axis=0)[None, None]
    q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    v = rng.standard_normal((b, l, hkv, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def load_qkv(path: str, dtype=jnp.float32):
    """Loads saved attention inputs from an ``.npz`` with arrays ``q``, ``k`` and optionally ``v``.

    Shapes [B, L, H, D] (a missing batch axis is added). Without ``v`` a random
    one is drawn: the selection metrics need only Q and K.
    """
    with np.load(path) as data:
        missing = {"q", "k"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: the .npz must hold arrays 'q' and 'k'; missing {sorted(missing)}")
        q, k = data["q"], data["k"]
        v = data["v"] if "v" in data.files else None
    if q.ndim == 3:
        q, k = q[None], k[None]
        v = None if v is None else v[None]
    if v is None:
        v = np.random.default_rng(0).standard_normal(k.shape)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))



def attention_inputs_on_device(cfg: SyntheticConfig = SyntheticConfig(), dtype=jnp.float32):
    """The same generative model as ``attention_inputs``, drawn with ``jax.random`` on the default device.

    Same ingredients and parameters, different random stream: the host generator is
    bit-reproducible everywhere but takes minutes at 128K tokens and 32 heads (float64 NumPy on
    one core), which a speed benchmark cannot afford; here the draws, the AR(1) content state
    (an associative scan) and the projections run on the accelerator.
    """
    if cfg.q_heads % cfg.kv_heads:
        raise ValueError(f"kv_heads must divide q_heads; got {cfg.kv_heads} and {cfg.q_heads}")
    import jax

    b, l, d = cfg.batch, cfg.length, cfg.head_dim
    hq, hkv = cfg.q_heads, cfg.kv_heads
    group = hq // hkv
    keys = iter(jax.random.split(jax.random.PRNGKey(cfg.seed), 16))
    f32 = jnp.float32
    # Segment starts: a Bernoulli(1 / mean_segment) boundary per token is a geometric length.
    starts = jax.random.bernoulli(next(keys), 1.0 / cfg.mean_segment, (b, l)).at[:, 0].set(True)
    seg_id = jnp.cumsum(starts, axis=1) - 1
    topics = jax.random.normal(next(keys), (b, l, hkv, d), f32) / np.sqrt(d)  # at most l segments
    topic = jnp.take_along_axis(topics, seg_id[:, :, None, None], axis=1)
    noise = jax.random.normal(next(keys), (b, l, hkv, d), f32) / np.sqrt(d)
    a = cfg.drift
    # state_i = a * state_{i-1} + sqrt(1 - a^2) * noise_i, state_0 = noise_0, as an associative scan.
    drive = noise * jnp.where(jnp.arange(l) == 0, 1.0, np.sqrt(1 - a * a))[None, :, None, None]
    coef = jnp.broadcast_to(jnp.where(jnp.arange(l) == 0, 0.0, a)[None, :, None, None], drive.shape)
    _, state = jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), (coef, drive), axis=1)
    wq = jax.random.normal(next(keys), (hq, d, d), f32) / np.sqrt(d)
    wk = jax.random.normal(next(keys), (hkv, d, d), f32) / np.sqrt(d)
    content_k = cfg.topic_strength * topic + state
    content_q = jnp.repeat(content_k, group, axis=2)
    wq = 0.6 * jnp.repeat(wk, group, axis=0) + 0.8 * wq
    hi = jax.lax.Precision.HIGHEST
    q = jnp.einsum("blhd,hde->blhe", content_q, wq, precision=hi) * np.sqrt(d) * 0.5
    k = jnp.einsum("blhd,hde->blhe", content_k, wk, precision=hi) * np.sqrt(d) * 0.5
    q += 0.3 * jax.random.normal(next(keys), q.shape, f32)
    k += 0.3 * jax.random.normal(next(keys), k.shape, f32)
    q *= jnp.exp(cfg.norm_sigma * jax.random.normal(next(keys), (b, l, hq, 1), f32))
    k *= jnp.exp(cfg.norm_sigma * jax.random.normal(next(keys), (b, l, hkv, 1), f32))
    shared = jax.random.normal(next(keys), (hkv, d), f32)
    shared /= jnp.linalg.norm(shared, axis=-1, keepdims=True)
    others = jax.random.choice(next(keys), jnp.arange(1, l), (max(cfg.num_sinks - 1, 0),), replace=False)
    sinks = jnp.concatenate([jnp.zeros((1,), others.dtype), others])
    k = k.at[:, sinks].set(cfg.sink_strength * np.sqrt(d) * shared[None, None] + 0.1 * k[:, sinks])
    q += 0.5 * jnp.repeat(shared, group, axis=0)[None, None]
    v = jax.random.normal(next(keys), (b, l, hkv, d), f32)
    q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    return tuple(x.astype(dtype) for x in (q, k, v))
