"""Checkpoint loaders (GGUF, Hugging Face safetensors for Llama and LLaDA) and Q/K/V capture.

Small random checkpoints are written on the fly in each format; the loaded model's logits
must equal an independent NumPy forward pass (float64) of the same weights, written here
in the Hugging Face layout: rotary embeddings on halves, so the GGUF checkpoint (rows of
Q and K permuted as llama.cpp's converter does) only matches if the loader gets its
adjacent-pair convention right.
"""

import json

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from baatt import BAConfig
from baatt.nn import AttentionPlan, capture_path, capture_qkv, load_gguf, load_safetensors

SPEC = dict(vocab=101, d_model=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96, theta=10_000.0, eps=1e-5,
            max_len=128)
LENGTH = 24


# ---------------------------------------------------------------- reference weights and forward pass (NumPy)

def random_weights(seed, *, tied):
    """Hugging Face layout: linear weights [out, in]."""
    rng = np.random.default_rng(seed)
    s = SPEC
    d, hd = s["d_model"], s["head_dim"]

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = dict(embed=normal(s["vocab"], d, scale=1.0), final_norm=1 + normal(d, scale=0.1), layers=[])
    w["head"] = None if tied else normal(s["vocab"], d, scale=d**-0.5)
    for _ in range(s["layers"]):
        w["layers"].append(dict(
            attn_norm=1 + normal(d, scale=0.1),
            q=normal(s["heads"] * hd, d, scale=d**-0.5),
            k=normal(s["kv_heads"] * hd, d, scale=d**-0.5),
            v=normal(s["kv_heads"] * hd, d, scale=d**-0.5),
            o=normal(d, s["heads"] * hd, scale=(s["heads"] * hd) ** -0.5),
            mlp_norm=1 + normal(d, scale=0.1),
            gate=normal(s["mlp"], d, scale=d**-0.5),
            up=normal(s["mlp"], d, scale=d**-0.5),
            down=normal(d, s["mlp"], scale=s["mlp"] ** -0.5),
        ))
    return w


def reference_forward(w, tokens, *, causal):
    """Logits [B, L, V] and, per layer, post-rotary q, k, v [B, L, H, D] (halves layout) and the attention
    output before the output projection [B, L, Hq, D]; float64 throughout."""
    s = SPEC
    hd, heads, kv_heads = s["head_dim"], s["heads"], s["kv_heads"]
    b, length = tokens.shape

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + s["eps"]) * scale

    inv = s["theta"] ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(length)[:, None] * inv[None, :]
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f64(w["embed"])[tokens]
    visible = np.tril(np.ones((length, length), bool)) if causal else np.ones((length, length), bool)
    layers = []
    for lw in w["layers"]:
        a = rms(x, f64(lw["attn_norm"]))
        q = rope((a @ f64(lw["q"]).T).reshape(b, length, heads, hd))
        k = rope((a @ f64(lw["k"]).T).reshape(b, length, kv_heads, hd))
        v = (a @ f64(lw["v"]).T).reshape(b, length, kv_heads, hd)
        group = heads // kv_heads  # query head h reads key/value head h // group
        kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(hd)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", p, vv)
        layers.append(dict(q=q, k=k, v=v, attention=attn))
        x = x + attn.reshape(b, length, -1) @ f64(lw["o"]).T
        m = rms(x, f64(lw["mlp_norm"]))
        gate = m @ f64(lw["gate"]).T
        x = x + ((gate / (1 + np.exp(-gate))) * (m @ f64(lw["up"]).T)) @ f64(lw["down"]).T
    x = rms(x, f64(w["final_norm"]))
    head = f64(w["embed"] if w["head"] is None else w["head"])
    return x @ head.T, layers


def assert_logits_match(model, w, tokens, *, causal):
    want, _ = reference_forward(w, tokens, causal=causal)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def tokens_of(seed, batch=2):
    return np.random.default_rng(seed).integers(0, SPEC["vocab"], (batch, LENGTH)).astype(np.int32)


# ---------------------------------------------------------------- GGUF

def llama_cpp_qk_rows(weight, num_heads):
    """Rows of a Q or K projection [H*D, in] as llama.cpp's converter stores them: in each head, rows
    (i, i + D/2) become adjacent (2i, 2i + 1)."""
    out, inp = weight.shape
    return weight.reshape(num_heads, 2, out // num_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def quantised(array):
    """The float32 array a Q8_0 tensor of ``array`` holds after dequantisation."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(array, q8), q8).astype(np.float32)


def write_gguf(path, w, *, arch="llama", drop=(), replace=None):
    s = SPEC
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(s["layers"])
    writer.add_context_length(s["max_len"])
    writer.add_embedding_length(s["d_model"])
    writer.add_feed_forward_length(s["mlp"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(s["theta"])
    writer.add_layer_norm_rms_eps(s["eps"])
    writer.add_vocab_size(s["vocab"])
    writer.add_rope_dimension_count(s["head_dim"])
    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors = {"token_embd.weight": (w["embed"], q8), "output_norm.weight": (w["final_norm"], None)}
    if w["head"] is not None:
        tensors["output.weight"] = (w["head"], None)
    for i, lw in enumerate(w["layers"]):
        tensors.update({
            f"blk.{i}.attn_norm.weight": (lw["attn_norm"], None),
            f"blk.{i}.attn_q.weight": (llama_cpp_qk_rows(lw["q"], s["heads"]), None),
            f"blk.{i}.attn_k.weight": (llama_cpp_qk_rows(lw["k"], s["kv_heads"]), None),
            f"blk.{i}.attn_v.weight": (lw["v"], None),
            f"blk.{i}.attn_output.weight": (lw["o"], None),
            f"blk.{i}.ffn_norm.weight": (lw["mlp_norm"], None),
            f"blk.{i}.ffn_gate.weight": (lw["gate"], q8),
            f"blk.{i}.ffn_up.weight": (lw["up"], None),
            f"blk.{i}.ffn_down.weight": (lw["down"], q8),
        })
    tensors.update(replace or {})
    for name, (array, qtype) in tensors.items():
        if name in drop:
            continue
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_reference_weights(w):
    """``w`` as the GGUF file holds it: the Q8_0 tensors rounded by quantisation."""
    out = dict(w, embed=quantised(w["embed"]), layers=[])
    for lw in w["layers"]:
        out["layers"].append(dict(lw, gate=quantised(lw["gate"]), down=quantised(lw["down"])))
    return out


@pytest.fixture(scope="module")
def gguf_checkpoint(tmp_path_factory):
    w = random_weights(0, tied=True)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, w)
    cfg, model = load_gguf(path, progress=False)
    return path, gguf_reference_weights(w), cfg, model


def test_gguf_llama_matches_numpy_forward(gguf_checkpoint):
    _, w, cfg, model = gguf_checkpoint
    assert cfg.rope_style == "interleaved" and cfg.causality == "causal" and cfg.tie_embeddings
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (2, 4, 2, 16, 96)
    assert cfg.mask_id is None and cfg.max_len == SPEC["max_len"] and cfg.norm_eps == pytest.approx(SPEC["eps"])
    assert_logits_match(model, w, tokens_of(1), causal=True)
    # the same weights read with the halves convention are a different (wrong) model: the test can tell
    _, wrong = load_gguf(gguf_checkpoint[0], progress=False, rope_style="half")
    want, _ = reference_forward(w, tokens_of(1), causal=True)
    assert np.abs(np.asarray(wrong(jnp.asarray(tokens_of(1))), np.float64) - want).max() > 1e-2 * np.abs(want).max()


def test_gguf_untied_head(tmp_path):
    w = random_weights(2, tied=False)
    write_gguf(tmp_path / "untied.gguf", w)
    cfg, model = load_gguf(tmp_path / "untied.gguf", progress=False)
    assert not cfg.tie_embeddings
    assert_logits_match(model, gguf_reference_weights(w), tokens_of(3), causal=True)


def test_gguf_errors(tmp_path):
    w = random_weights(4, tied=True)
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf(tmp_path / "absent.gguf")
    write_gguf(tmp_path / "gpt2.gguf", w, arch="gpt2")
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf", progress=False)
    write_gguf(tmp_path / "missing.gguf", w, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' is missing"):
        load_gguf(tmp_path / "missing.gguf", progress=False)
    bad_q = np.zeros((SPEC["heads"] * SPEC["head_dim"] - 16, SPEC["d_model"]), np.float32)
    write_gguf(tmp_path / "shape.gguf", w, replace={"blk.0.attn_q.weight": (bad_q, None)})
    with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' in .*shape.gguf has shape \(48, 64\).*needs \(64, 64\)"):
        load_gguf(tmp_path / "shape.gguf", progress=False)


# ---------------------------------------------------------------- Hugging Face safetensors

def llama_tensors(w):
    t = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["final_norm"]}
    if w["head"] is not None:
        t["lm_head.weight"] = w["head"]
    for i, lw in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": lw["attn_norm"], p + "self_attn.q_proj.weight": lw["q"],
            p + "self_attn.k_proj.weight": lw["k"], p + "self_attn.v_proj.weight": lw["v"],
            p + "self_attn.o_proj.weight": lw["o"], p + "post_attention_layernorm.weight": lw["mlp_norm"],
            p + "mlp.gate_proj.weight": lw["gate"], p + "mlp.up_proj.weight": lw["up"],
            p + "mlp.down_proj.weight": lw["down"],
        })
    return t


def llada_tensors(w):
    t = {"model.transformer.wte.weight": w["embed"], "model.transformer.ln_f.weight": w["final_norm"],
         "model.transformer.ff_out.weight": w["head"]}
    for i, lw in enumerate(w["layers"]):
        p = f"model.transformer.blocks.{i}."
        t.update({
            p + "attn_norm.weight": lw["attn_norm"], p + "q_proj.weight": lw["q"], p + "k_proj.weight": lw["k"],
            p + "v_proj.weight": lw["v"], p + "attn_out.weight": lw["o"], p + "ff_norm.weight": lw["mlp_norm"],
            p + "ff_proj.weight": lw["gate"], p + "up_proj.weight": lw["up"], p + "ff_out.weight": lw["down"],
        })
    return t


def llama_config(**changes):
    s = SPEC
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=s["d_model"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                  intermediate_size=s["mlp"], rms_norm_eps=s["eps"], rope_theta=s["theta"],
                  max_position_embeddings=s["max_len"], vocab_size=s["vocab"], tie_word_embeddings=True,
                  hidden_act="silu", rope_scaling=None, torch_dtype="bfloat16")
    return dict(config, **changes)


def llada_config():
    s = SPEC
    return dict(architectures=["LLaDAModelLM"], model_type="llada", d_model=s["d_model"], n_heads=s["heads"],
                n_kv_heads=s["kv_heads"], n_layers=s["layers"], mlp_hidden_size=s["mlp"], vocab_size=s["vocab"],
                embedding_size=s["vocab"], mask_token_id=s["vocab"] - 1, rope_theta=s["theta"], rms_norm_eps=s["eps"],
                weight_tying=False, max_sequence_length=s["max_len"], include_bias=False, include_qkv_bias=False,
                block_type="llama", activation_type="silu")


def write_hf(directory, config, tensors, *, shards=1):
    """config.json plus model.safetensors, or ``shards`` files and their index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_safetensors_llama_single_file_and_shards(tmp_path):
    w = random_weights(5, tied=True)
    w["embed"] = w["embed"].astype(ml_dtypes.bfloat16)  # checkpoints are usually bf16: read as its exact values
    write_hf(tmp_path / "single", llama_config(), llama_tensors(w))
    cfg, model = load_safetensors(tmp_path / "single", progress=False)
    assert cfg.rope_style == "half" and cfg.causality == "causal" and cfg.tie_embeddings and cfg.mask_id is None
    assert_logits_match(model, w, tokens_of(6), causal=True)

    w = random_weights(7, tied=False)
    write_hf(tmp_path / "sharded", llama_config(tie_word_embeddings=False), llama_tensors(w), shards=3)
    assert len(list((tmp_path / "sharded").glob("model-0000?-of-00003.safetensors"))) == 3
    cfg, model = load_safetensors(tmp_path / "sharded", progress=False)
    assert not cfg.tie_embeddings
    assert_logits_match(model, w, tokens_of(8), causal=True)


def test_safetensors_llada(tmp_path):
    w = random_weights(9, tied=False)
    write_hf(tmp_path / "llada", llada_config(), llada_tensors(w), shards=2)
    cfg, model = load_safetensors(tmp_path / "llada", progress=False)
    assert cfg.causality == "bidirectional" and cfg.mask_id == SPEC["vocab"] - 1 and not cfg.tie_embeddings
    assert_logits_match(model, w, tokens_of(10), causal=False)


def test_safetensors_errors(tmp_path):
    w = random_weights(11, tied=True)
    tensors = llama_tensors(w)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_safetensors(tmp_path / "nothing")
    write_hf(tmp_path / "gpt2", llama_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), tensors)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_safetensors(tmp_path / "gpt2", progress=False)
    write_hf(tmp_path / "shards", llama_config(), tensors, shards=2)
    (tmp_path / "shards" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_safetensors(tmp_path / "shards", progress=False)
    write_hf(tmp_path / "shape", llama_config(), dict(tensors, **{"model.layers.1.mlp.up_proj.weight": w["layers"][1]["down"]}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in .*model.safetensors has shape \(64, 96\)"):
        load_safetensors(tmp_path / "shape", progress=False)
    write_hf(tmp_path / "bias", llama_config(), dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": w["final_norm"]}))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.bias' have no place"):
        load_safetensors(tmp_path / "bias", progress=False)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    write_hf(tmp_path / "missing", llama_config(), tensors)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight' is missing"):
        load_safetensors(tmp_path / "missing", progress=False)
    write_hf(tmp_path / "scaled", llama_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), tensors)
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        load_safetensors(tmp_path / "scaled", progress=False)


# ---------------------------------------------------------------- capture

def test_capture_qkv_reproduces_layer_attention(gguf_checkpoint, tmp_path):
    _, w, cfg, model = gguf_checkpoint
    tokens = tokens_of(12)
    _, ref = reference_forward(w, tokens, causal=True)
    got = capture_qkv(model, tokens, layers=[-1], out_dir=tmp_path)
    assert list(got) == [1] and capture_path(tmp_path, 1, "q").is_file()
    q, k, v = (got[1][n] for n in ("q", "k", "v"))
    assert isinstance(q, np.memmap) and q.shape == (2, LENGTH, 4, 16) and k.shape == v.shape == (2, LENGTH, 2, 16)
    # a GGUF model's heads hold rotary pairs adjacent: the reference's halves, interleaved
    interleave = lambda x: x.reshape(*x.shape[:-1], 2, -1).swapaxes(-1, -2).reshape(x.shape)  # noqa: E731
    for name, array in (("q", q), ("k", k)):
        np.testing.assert_allclose(array, interleave(ref[1][name]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, ref[1]["v"], rtol=1e-4, atol=1e-4)
    out = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    np.testing.assert_allclose(np.asarray(out), ref[1]["attention"], rtol=1e-4, atol=1e-4)


def test_capture_qkv_bidirectional_in_memory(tmp_path):
    w = random_weights(13, tied=False)
    write_hf(tmp_path / "llada", llada_config(), llada_tensors(w))
    _, model = load_safetensors(tmp_path / "llada", progress=False)
    tokens = tokens_of(14, batch=1)
    _, ref = reference_forward(w, tokens, causal=False)
    got = capture_qkv(model, tokens, layers=[0])
    assert list(got) == [0] and not isinstance(got[0]["q"], np.memmap)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(got[0][name], ref[0][name], rtol=1e-4, atol=1e-4)
    out = jax.nn.dot_product_attention(*(jnp.asarray(got[0][n]) for n in ("q", "k", "v")))
    np.testing.assert_allclose(np.asarray(out), ref[0]["attention"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"layers must hold layer indices in \[-2, 2\)"):
        capture_qkv(model, tokens, layers=[2])
    # a causal model with a sparse plan runs under its mask: with every block kept, what dense attention captures
    causal = load_safetensors(tmp_path / "llada", progress=False, causality="causal")[1]
    sparse = capture_qkv(causal, tokens, layers=[1], attention=AttentionPlan.ba(BAConfig(block_size=8)))
    np.testing.assert_allclose(sparse[1]["q"], capture_qkv(causal, tokens, layers=[1])[1]["q"], rtol=1e-4, atol=1e-4)
