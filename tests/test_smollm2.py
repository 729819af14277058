"""SmolLM2-135M-Instruct from its GGUF (installed by scripts/setup_data.sh), and the GGUF tokenizer.

Acceptance of the loader on a real model: causal perplexity of the 2010 State of the
Union address and a greedy completion. Perplexity on the first 8,192 tokens is 20.70
(20.7 by an independent NumPy forward pass); this test measures the first 1,024 tokens
(23.78) to stay within CPU test time. Reading the GGUF with the halves rotary convention
instead of llama.cpp's adjacent pairs would give a perplexity in the hundreds.
"""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers

from baatt.adapt import adapt_for_diffusion
from baatt.data import data_dir
from baatt.data.gguf_tokenizer import GGUFTokenizer
from baatt.nn import get_config, load_smollm2, smollm2_path

needs_smollm2 = pytest.mark.skipif(
    not smollm2_path().is_file(),
    reason=f"SmolLM2 GGUF not installed at {smollm2_path()} (run `bash scripts/setup_data.sh`)",
)
SOTU_2010 = data_dir() / "raw" / "sotu" / "2010_barack_obama_d.txt"


@pytest.fixture(scope="module")
def smollm2():
    cfg, model, tokenizer = load_smollm2(progress=False)
    return cfg, model, tokenizer


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


# ---------------------------------------------------------------- tokenizer on a small synthetic GGUF

def write_tokenizer_gguf(path, *, pre="smollm", kind="gpt2"):
    """Byte-level BPE vocabulary: two control tokens, the 256 byte symbols, then four merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "1 0"]
    tokens = ["<|endoftext|>", "<|im_start|>"] + alphabet + ["Ġt", "he", "Ġthe", "10"]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_gguf_tokenizer_from_metadata(tmp_path):
    tokens = write_tokenizer_gguf(tmp_path / "smollm.gguf")
    tok = GGUFTokenizer(tmp_path / "smollm.gguf")
    assert tok.vocab_size == len(tokens) and (tok.bos_id, tok.eos_id) == (1, 0) and tok.special_ids == {0, 1}
    the, ten = tokens.index("Ġthe"), tokens.index("10")
    assert tok.encode(" the") == [the]
    # "smollm" splits digits one by one before BPE, so the merge "1 0" never applies; "gpt-2" keeps numbers whole
    assert ten not in tok.encode("2010") and len(tok.encode("2010")) == 4
    write_tokenizer_gguf(tmp_path / "gpt2.gguf", pre="gpt-2")
    assert GGUFTokenizer(tmp_path / "gpt2.gguf").encode("2010")[-1] == ten
    assert tok.encode("<|im_start|> the")[:1] == [1]  # control tokens are matched whole
    for text in ("the theme, 2010 — naïve café 😀\n\n\tok", "<|im_start|>user\nhi<|endoftext|>"):
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match=r"token id must be in \[0, 262\)"):
        tok.decode([5000])
    write_tokenizer_gguf(tmp_path / "llama3.gguf", pre="llama-bpe")
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.pre='llama-bpe'"):
        GGUFTokenizer(tmp_path / "llama3.gguf")
    write_tokenizer_gguf(tmp_path / "spm.gguf", kind="llama")
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.model='llama'"):
        GGUFTokenizer(tmp_path / "spm.gguf")


# ---------------------------------------------------------------- SmolLM2 itself

@needs_smollm2
@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
    cfg, _, tok = smollm2
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (30, 576, 9, 3, 64, 1536)
    assert (cfg.vocab_size, cfg.max_len, cfg.rope_theta, cfg.tie_embeddings) == (49152, 8192, 100_000.0, True)
    assert cfg.causality == "causal" and cfg.rope_style == "interleaved" and cfg.norm_eps == pytest.approx(1e-5)
    assert tok.vocab_size == 49152 and tok.encode("<|im_start|>assistant\n")[0] == 1 == tok.bos_id
    text = SOTU_2010.read_text()
    ids = tok.encode(text)
    assert tok.decode(ids) == text and 8192 < len(ids) < 9000
    assert tok.encode("2010") == [tok.encode(d)[0] for d in "2010"]  # digits one by one
    # the random-init preset that times the adapted model has its transformer's shape
    shape = get_config("smollm2_shape")
    fields = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_len", "rope_theta",
              "tie_embeddings")
    assert {f: getattr(shape, f) for f in fields} == {f: getattr(cfg, f) for f in fields}
    assert shape.norm_eps == pytest.approx(cfg.norm_eps)  # the GGUF stores it as a float32
    assert shape.shift_logits and shape.causality == "bidirectional" == adapt_for_diffusion(smollm2[1]).cfg.causality


@needs_smollm2
@pytest.mark.slow
def test_smollm2_perplexity_on_2010_state_of_the_union(smollm2):
    _, model, tok = smollm2
    tokens = jnp.asarray([tok.encode(SOTU_2010.read_text())[:1024]], jnp.int32)
    logp = jax.nn.log_softmax(_logits(model, tokens)[0, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1))
    assert 23.3 < float(jnp.exp(nll)) < 24.3  # 23.78; at 8192 tokens 20.70


@needs_smollm2
@pytest.mark.slow
def test_smollm2_greedy_completion_knows_paris(smollm2):
    _, model, tok = smollm2
    sequence = tok.encode("The capital of France is")
    window = np.zeros((1, 16), np.int32)  # one compiled length: causal, so the padding after the text is never seen
    for _ in range(4):
        window[0, : len(sequence)] = sequence
        sequence.append(int(jnp.argmax(_logits(model, jnp.asarray(window))[0, len(sequence) - 1])))
    assert "Paris" in tok.decode(sequence)
