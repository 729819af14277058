"""The NNX diffusion LM: shapes, gradients, pluggable attention, presets, the nnx attention_fn adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baatt import BAConfig
from baatt.nn import AttentionPlan, DiffusionLM, ModelConfig, ba_attention_fn, count_params, get_config

CFG = get_config("tiny", max_len=256, vocab_size=512, mask_id=511)  # small vocab: fast CPU tests


@pytest.fixture(scope="module")
def model():
    return DiffusionLM(CFG, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames=("attention", "return_aux"))
def _run(model, x, key_mask=None, attention=None, selections=None, return_aux=False):
    """Jitted forward (one compile beats op-by-op dispatch of the BA-Att pipeline on CPU)."""
    return model(x, key_mask=key_mask, attention=attention, selections=selections, return_aux=return_aux)


def _tokens(b=2, l=80, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 511, (b, l)), jnp.int32)


def test_forward_backward_shapes(model):
    x = _tokens()
    logits = _run(model, x)
    assert logits.shape == (2, 80, CFG.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(x).astype(jnp.float32), axis=-1))

    grads = nnx.jit(nnx.grad(loss))(model)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.shape == p.shape and bool(jnp.all(jnp.isfinite(g)))
    assert count_params(model) == sum(p.size for p in jax.tree.leaves(params))


def test_untied_head_and_bf16():
    m = DiffusionLM(CFG.replace(tie_embeddings=False, dtype="bfloat16"), rngs=nnx.Rngs(1))
    out = _run(m, _tokens(1, 40))
    assert out.shape == (1, 40, CFG.vocab_size) and out.dtype == jnp.bfloat16
    assert count_params(m) == count_params(DiffusionLM(CFG, rngs=nnx.Rngs(1))) + CFG.d_model * CFG.vocab_size


def test_small_preset_size():
    m = nnx.eval_shape(lambda: DiffusionLM(get_config("small"), rngs=nnx.Rngs(0)))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert 20e6 <= n <= 40e6


@pytest.mark.parametrize("ba", [
    BAConfig(block_size=16),
    BAConfig(block_size=16, sort_q=True, sort_k=True),
    BAConfig(block_size=16, sort_k=True, compensate=True, beta=0.5),
])
def test_ba_with_every_block_kept_equals_dense(model, ba):
    x = _tokens(2, 70)  # 70 is not a multiple of the block size
    dense = _run(model, x, attention=AttentionPlan.dense())
    sparse, aux = _run(model, x, attention=AttentionPlan.ba(ba, compensate_layers=("first", "last")), return_aux=True)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=2e-5, rtol=2e-5)
    assert all(abs(float(jnp.min(d)) - 1.0) < 1e-6 for d in aux["density"])


def test_key_mask_matches_dense(model):
    x = _tokens(2, 64)
    km = jnp.arange(64)[None, :] < jnp.asarray([[64], [40]])
    dense = _run(model, x, key_mask=km)
    sparse = _run(model, x, key_mask=km, attention=AttentionPlan.ba(BAConfig(block_size=16)))
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=2e-5, rtol=2e-5)


def test_sparse_plan_and_selection_reuse(model):
    x = _tokens(1, 128)
    plan = AttentionPlan.ba(BAConfig(block_size=16, sparsity=0.5))
    a, aux = _run(model, x, attention=plan, return_aux=True)
    assert all(abs(float(jnp.mean(d)) - 0.5) < 1e-6 for d in aux["density"])
    assert float(jnp.max(jnp.abs(a - _run(model, x)))) > 0  # sparse differs from dense
    b, aux2 = _run(model, x, attention=plan, selections=aux["selections"], return_aux=True)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="selections must hold one entry per layer"):
        model(x, attention=plan, selections=aux["selections"][:1])


def test_compensation_first_and_last_is_one_setting():
    plan = AttentionPlan.ba(BAConfig(sparsity=0.5, compensate=False), compensate_layers=("first", "last"))
    comp = [plan.layer_config(i, 6).compensate for i in range(6)]
    assert comp == [True, False, False, False, False, True]
    plan = AttentionPlan.ba(BAConfig(sparsity=0.5), compensate_layers=(2,))
    assert [plan.layer_config(i, 4).compensate for i in range(4)] == [False, False, True, False]
    per_layer = AttentionPlan(kind="ba", layer_configs=(None, BAConfig(sparsity=0.7)))
    assert per_layer.layer_config(0, 2) is None and per_layer.layer_config(1, 2).sparsity == 0.7
    assert AttentionPlan.dense().layer_config(0, 2) is None
    hash(plan)  # static argument of jit
    with pytest.raises(ValueError, match="one entry per layer"):
        per_layer.layer_config(0, 3)
    with pytest.raises(ValueError, match="compensate_layers entries must be"):
        AttentionPlan.ba(BAConfig(), compensate_layers=("middle",))
    with pytest.raises(ValueError, match="compensate_layers needs a selector that applies compensation; 'xattention' does not"):
        AttentionPlan.ba(BAConfig(sparsity=0.5, selector="xattention"), compensate_layers=("first",))
    with pytest.raises(ValueError, match="kind must be 'dense' or 'ba'"):
        AttentionPlan(kind="sparse")


def test_config_errors(model):
    with pytest.raises(ValueError, match="model preset must be one of"):
        get_config("huge")
    with pytest.raises(ValueError, match=r"sequence length must be at most ModelConfig.max_len=256"):
        model(_tokens(1, 300))
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="tokens must have shape"):
        model(jnp.zeros((4,), jnp.int32))


def test_nnx_multihead_attention_adapter():
    kw = dict(num_heads=4, in_features=32, qkv_features=32, decode=False)
    ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(3))
    ba = nnx.MultiHeadAttention(**kw, attention_fn=ba_attention_fn(BAConfig(block_size=8)), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 32))
    call = nnx.jit(lambda m, x, mask=None: m(x, mask=mask))
    np.testing.assert_allclose(np.asarray(call(ba, x)), np.asarray(call(ref, x)), atol=1e-5, rtol=1e-5)
    # Key padding mask (as nnx.make_attention_mask builds it).
    valid = jnp.arange(40)[None] < jnp.asarray([[40], [25]])
    mask = nnx.make_attention_mask(valid, valid)
    out_ba, out_ref = call(ba, x, mask), call(ref, x, mask)
    np.testing.assert_allclose(np.asarray(out_ba[1, :25]), np.asarray(out_ref[1, :25]), atol=1e-5, rtol=1e-5)
    # Sparse: runs, differs.
    sp = nnx.MultiHeadAttention(**kw, attention_fn=ba_attention_fn(BAConfig(block_size=8, sparsity=0.6)), rngs=nnx.Rngs(3))
    assert call(sp, x).shape == (2, 40, 32)
    # A causal mask runs causal attention; a banded one cannot be a key mask.
    np.testing.assert_allclose(np.asarray(ba(x, mask=nnx.make_causal_mask(jnp.ones((2, 40))))),
                               np.asarray(ref(x, mask=nnx.make_causal_mask(jnp.ones((2, 40))))), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key-padding masks, alone or with causal attention"):
        ba(x, mask=nnx.make_attention_mask(jnp.arange(40), jnp.arange(40), lambda i, j: abs(i - j) < 4))


def test_output_bias_starts_at_unigram():
    cfg = CFG.replace(output_bias=True)
    m = DiffusionLM(cfg, rngs=nnx.Rngs(0))
    assert count_params(m) == count_params(DiffusionLM(CFG, rngs=nnx.Rngs(0))) + cfg.vocab_size
    counts = np.zeros(cfg.vocab_size)
    counts[:10] = 1000.0
    m.set_output_bias(counts)
    logp = jax.nn.log_softmax(_run(m, _tokens(1, 16)).astype(jnp.float32), -1)
    # the embedding logits are small at init: the prediction is close to the unigram
    assert float(jnp.mean(jnp.exp(logp[..., :10]).sum(-1))) > 0.95
    assert float(jnp.max(logp[..., cfg.mask_id])) < -5
    with pytest.raises(ValueError, match="output_bias"):
        DiffusionLM(CFG, rngs=nnx.Rngs(0)).set_output_bias(counts)
    with pytest.raises(ValueError, match="shape"):
        m.set_output_bias(counts[:5])


def test_hidden_and_logits_split_the_forward():
    hidden = nnx.jit(lambda m, x: m.hidden(x, return_aux=True))
    for cfg in (CFG, CFG.replace(tie_embeddings=False, output_bias=True)):
        m = DiffusionLM(cfg, rngs=nnx.Rngs(2))
        if m.out_bias is not None:
            m.out_bias[...] = jax.random.normal(jax.random.PRNGKey(1), (cfg.vocab_size,))
        x = _tokens(2, 48)
        full = _run(m, x)
        h, aux = hidden(m, x)
        assert h.shape == (2, 48, cfg.d_model) and len(aux["density"]) == cfg.num_layers
        np.testing.assert_allclose(np.asarray(m.logits(h)), np.asarray(full), atol=1e-5, rtol=1e-5)
        # any leading shape: a gathered [K, d] set of vectors gives the same rows as the full logits
        np.testing.assert_allclose(np.asarray(m.logits(h[1, ::7])), np.asarray(full[1, ::7]), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="last dimension d_model"):
            m.logits(jnp.zeros((3, cfg.d_model + 1)))


def test_embedding_gradient_accumulates_in_float32():
    """Same values as nnx.Embed in bf16; the gradient of a row shared by many positions stays exact to bf16 input
    rounding, where a bf16 table (nnx.Embed's cast-then-gather) sums the contributions with 8-bit mantissas."""
    from baatt.nn.model import embed_tokens

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    tokens = jnp.asarray(np.where(rng.uniform(size=(8, 512)) < 0.5, 7, rng.integers(0, 64, (8, 512))), jnp.int32)
    w = jnp.asarray(rng.normal(size=(8, 512, 16)), jnp.bfloat16)  # cotangents, as a bf16 network would send back
    emb = nnx.Embed(64, 16, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    emb.embedding[...] = table
    np.testing.assert_array_equal(np.asarray(embed_tokens(table, tokens, jnp.bfloat16), np.float32),
                                  np.asarray(emb(tokens), np.float32))
    exact = np.zeros((64, 16))
    np.add.at(exact, np.asarray(tokens), np.asarray(w, np.float64))
    ours = jax.grad(lambda t: jnp.sum((embed_tokens(t, tokens, jnp.bfloat16) * w).astype(jnp.float32)))(table)

    def via_bf16_table(t):
        return jnp.sum((jnp.take(t.astype(jnp.bfloat16), tokens, axis=0) * w).astype(jnp.float32))

    theirs = jax.grad(via_bf16_table)(table)
    err = lambda g: float(np.abs(np.asarray(g, np.float64)[7] - exact[7]).max() / np.abs(exact[7]).max())
    assert err(ours) < 1e-5
    assert err(theirs) > 100 * err(ours)  # the bf16 accumulation this avoids (the test can tell them apart)


def test_sums_over_tokens_accumulate_in_float32_in_a_bf16_model():
    """Gradients of the output bias and of the norm scales are sums over every position: float32 in a bf16 model."""
    # The sums run over the 4096 positions; a small vocabulary keeps the [4096, vocab] logits cheap.
    cfg = get_config("tiny", dtype="bfloat16", output_bias=True, vocab_size=256, mask_id=255)
    model = DiffusionLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(4096, cfg.d_model)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(4096, cfg.vocab_size)), jnp.bfloat16)
    gd, st = nnx.split(model)
    _, vjp = jax.vjp(lambda st, h: nnx.merge(gd, st).logits(h), st, h)
    g_bias = np.asarray(nnx.to_pure_dict(vjp(ct)[0])["out_bias"], np.float64)
    exact = np.asarray(ct, np.float64).sum(0)
    assert np.abs(g_bias - exact).max() < 1e-4 * np.abs(exact).max()

    norm = model.blocks[0].attn_norm
    x = jnp.asarray(rng.normal(size=(4096, cfg.d_model)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(4096, cfg.d_model)), jnp.float32)
    gd, st = nnx.split(norm)
    _, vjp = jax.vjp(lambda st, x: nnx.merge(gd, st)(x).astype(jnp.float32), st, x)
    g_scale = np.asarray(nnx.to_pure_dict(vjp(dy)[0])["scale"], np.float64)
    xf = np.asarray(x, np.float64)
    exact = (np.asarray(dy, np.float64) * xf / np.sqrt((xf**2).mean(-1, keepdims=True) + cfg.norm_eps)).sum(0)
    assert np.abs(g_scale - exact).max() < 1e-4 * np.abs(exact).max()


def test_short_conv_starts_as_identity_and_mixes_only_predecessors():
    from baatt.nn.model import ShortConv

    cfg = CFG
    tokens = _tokens(2, 40, seed=3)
    plain = DiffusionLM(cfg, rngs=nnx.Rngs(0))
    conv = DiffusionLM(cfg.replace(short_conv=4), rngs=nnx.Rngs(0))
    # zero-initialised: the same function as the model without it (no other weight moved)
    np.testing.assert_allclose(np.asarray(conv(tokens)), np.asarray(plain(tokens)), rtol=1e-6, atol=1e-6)

    layer = ShortConv(cfg.replace(short_conv=3), rngs=nnx.Rngs(0))
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, cfg.d_model)))
    layer.weight[...] = jnp.asarray(w)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 9, cfg.d_model)))
    want = x.copy()
    for t in range(9):
        for j in range(3):
            if t - j >= 0:
                want[:, t] += w[j] * x[:, t - j]
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    # padding (key_mask False) never reaches a real token; the real prefix is as without padding
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    got = np.asarray(layer(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got[1, :6], want[1, :6], rtol=1e-5, atol=1e-5)
    x2 = x.copy()
    x2[1, 6:] = 1e3
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x2), jnp.asarray(mask)))[1, :6], got[1, :6], rtol=1e-6)

    # the weights learn: their gradient through the whole model is not zero
    def loss(m):
        return jnp.mean(m(tokens).astype(jnp.float32) ** 2)

    grads = nnx.grad(loss)(conv)
    assert float(jnp.abs(grads.blocks[0].conv.weight[...]).sum()) > 0
    with pytest.raises(ValueError, match="short_conv must be 0"):
        cfg.replace(short_conv=1)


def test_causal_and_block_causal_masks():
    from baatt.nn import dense_attention

    x = _tokens(2, 40, seed=5)
    changed = x.at[:, 20].set((x[:, 20] + 1) % 511)  # one token of block 2 (positions 16..23 for blocks of 8)
    run = nnx.jit(lambda m, x: m(x))
    models = {name: DiffusionLM(CFG.replace(**kw), rngs=nnx.Rngs(0)) for name, kw in {
        "bidirectional": {},
        "causal": dict(causality="causal"),
        "block8": dict(causality="block_causal", causal_block_size=8),
        "block1": dict(causality="block_causal", causal_block_size=1),
        "block64": dict(causality="block_causal", causal_block_size=64),
    }.items()}
    out = {name: (np.asarray(run(m, x)), np.asarray(run(m, changed))) for name, m in models.items()}
    moved = {name: np.abs(a - b).max(axis=(0, 2)) > 1e-6 for name, (a, b) in out.items()}  # [L]: position changed
    assert not moved["causal"][:20].any() and moved["causal"][20:].all()
    assert not moved["block8"][:16].any() and moved["block8"][16:].all()
    assert moved["bidirectional"].all()
    np.testing.assert_allclose(out["block1"][0], out["causal"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["block64"][0], out["bidirectional"][0], rtol=1e-5, atol=1e-5)

    # the mask itself, against the explicit mask of jax.nn.dot_product_attention
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 12, 2, 8)) for i in range(3))
    visible = (jnp.arange(12)[None, :] // 4 <= jnp.arange(12)[:, None] // 4)[None, None]
    np.testing.assert_allclose(np.asarray(dense_attention(q, k, v, causality="block_causal", causal_block_size=4)),
                               np.asarray(jax.nn.dot_product_attention(q, k, v, mask=visible)), rtol=1e-6, atol=1e-6)
    # BA-Att layers run under the model's mask: with every block kept, the dense causal model
    np.testing.assert_allclose(np.asarray(models["causal"](x, attention=AttentionPlan.ba(BAConfig(block_size=8)))),
                               out["causal"][0], rtol=1e-5, atol=1e-5)


def test_interleaved_rope_is_the_halves_rope_on_permuted_dimensions():
    from baatt.nn import apply_rope, rope_tables

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 3, 16))
    cos, sin = rope_tables(10, 16, 10_000.0)
    interleave = lambda a: a.reshape(*a.shape[:-1], 2, 8).swapaxes(-1, -2).reshape(a.shape)  # noqa: E731
    np.testing.assert_allclose(np.asarray(apply_rope(interleave(x), cos, sin, "interleaved")),
                               np.asarray(interleave(apply_rope(x, cos, sin, "half"))), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rope style must be"):
        apply_rope(x, cos, sin, "neox")


def test_causality_rope_and_mask_token_fields():
    assert CFG.causality == "bidirectional" and CFG.rope_style == "half" and CFG.causal_block_size is None
    with pytest.raises(ValueError, match="rope_style must be one of"):
        CFG.replace(rope_style="gptj")
    with pytest.raises(ValueError, match="causality must be one of"):
        CFG.replace(causality="prefix")
    with pytest.raises(ValueError, match="causal_block_size must be a positive int"):
        CFG.replace(causality="block_causal")
    with pytest.raises(ValueError, match="causal_block_size applies to causality='block_causal' only"):
        CFG.replace(causal_block_size=8)
    # a causal LM has no mask token: the unigram bias then covers every token
    m = DiffusionLM(CFG.replace(mask_id=None, causality="causal", output_bias=True), rngs=nnx.Rngs(0))
    m.set_output_bias(np.ones(CFG.vocab_size))
    np.testing.assert_allclose(np.asarray(m.out_bias[...]), np.log(1 / CFG.vocab_size), rtol=1e-5)
