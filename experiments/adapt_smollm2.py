"""python -m experiments.adapt_smollm2 --out $OUT          (one GPU, ~9 min: training and evaluation)
python -m experiments.adapt_smollm2 --preset cpu_smoke --out /tmp/smoke   (CPU, about a minute)
python -m experiments.adapt_smollm2 --prepare-only    (CPU: SmolLM2's token streams, to send to a GPU machine)

SmolLM2-135M-Instruct adapted to a masked-diffusion LM (``baatt.adapt``: bidirectional
attention, a mask token, shifted logits, continued training with the masked-diffusion loss and
passkey / multi-key NIAH rows), then evaluated under dense attention and every block selector.
Training and evaluation run in one process: the trained weights (1.6 GB with the optimizer
state) never leave the machine.

1. The GGUF: ``.data/models/SmolLM2-135M-Instruct.Q4_1.gguf``, joined from the parts of
   ``scripts/split_gguf.sh`` (in ``.data/carry/``) when it is missing.
2. Reference: the causal model's perplexity on held-out text (the corpus's validation split in
   SmolLM2's tokens, ``baatt.adapt.token_streams``).
3. Before training (step 0): masked NLL, passkey and multi-key NIAH accuracy of the adapted,
   untrained model, dense, at the first length.
4. Training: ``baatt.train.train`` with ``baatt.adapt.PRESETS["smollm2_dlm"]`` for its time
   budget (``--time-budget-s``); resumable from ``--ckpt-dir`` (a finished run resumes straight
   to the evaluation).
5. Evaluation per length (``--lengths``) and attention variant (dense, then each selector at
   each sparsity, block 128, the same top-k budget): masked-token NLL (per token and per byte)
   at masking ratios 0.15 / 0.5 / 0.85 of held-out text, same masks for every variant, and
   one-shot passkey / multi-key NIAH exact match (the whole answer masked, every answer token
   from one forward pass), with the density each variant used. Selectors run in the order of
   ``--selectors`` (default: every registered one, :data:`SELECTOR_ORDER` first); the forward
   pass of each (variant, length) is compiled ahead in ``--compile-threads`` threads, and
   variants still waiting at ``--deadline-s`` (seconds since the start) are listed as skipped.
   ``baatt`` is the paper's recipe (norm-sorted Q and K, compensation with beta = 1 in the first
   and last layers); ``xattention`` uses stride 8; every other selector its defaults. With
   ``--tails none pooled`` each selector row has a twin with the pooled estimate of its dropped
   blocks (``BAConfig(tail="pooled")``), named ``<selector>+tail@<sparsity>``.

Writes ``<name>.json`` and ``<name>.md`` under ``--out`` (default
``experiments/results/smollm2_dlm/``) after every row, so a run stopped early keeps what it
measured. Masked NLLs of the from-scratch models (``--reference-results``) are listed beside,
per GPT-2 token and, when ``.data/tokens/val.npy`` is there, per byte.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import subprocess
import tempfile
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import baatt
from baatt import adapt
from baatt.config import BAConfig
from baatt.data import corpus, tasks
from baatt.data.gguf_tokenizer import GGUFTokenizer
from baatt.diffusion.masking import forward_process
from baatt.nn import AttentionPlan, count_params, load_gguf, smollm2_path
from baatt.train import TrainConfig, restore_weights, train
from experiments import harness
from experiments.train_dlm import parse_stage

# Selectors in the order they are evaluated (the registered ones; any other registered selector follows).
SELECTOR_ORDER = ("baatt", "meanpool", "xattention", "pooled_query", "query_token", "quest", "mixed", "proxy", "oracle",
                  "max_oracle", "last_query", "sparge_like", "random")
NLL_RATIOS = (0.15, 0.5, 0.85)
TASK_KINDS = ("passkey", "multikey_niah")


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "gpu"
    train: TrainConfig = dataclasses.replace(adapt.PRESETS["smollm2_dlm"], ckpt_dir=".ckpt/smollm2_dlm")
    gguf: str | None = harness.option(
        None, "GGUF to adapt (default: SmolLM2 in .data/models, joined from .data/carry/ parts when missing; "
              "preset cpu_smoke: a tiny random one written on the fly)")
    dtype: str = harness.option("bfloat16", "compute dtype of the model", choices=("bfloat16", "float32"))
    shift_logits: bool = harness.option(True, "predict token i from position i - 1 (ModelConfig.shift_logits)")
    max_documents: int | None = harness.option(
        None, "only the first that many documents of each corpus split (the token streams are then not cached)")
    ppl_seqs: int = harness.option(8, "held-out sequences for the causal perplexity")
    ppl_len: int = harness.option(2048, "their length")
    lengths: tuple[int, ...] = harness.option((2048, 4096, 8192), "evaluation lengths")
    sparsities: tuple[float, ...] = harness.option((0.5, 0.7, 0.9), "fixed-budget sparsities of the selectors")
    selectors: tuple[str, ...] | None = harness.option(
        None, "selectors to evaluate, in this order (none: every registered one but dense)")
    block_size: int = harness.option(128, "block size of the selectors")
    tails: tuple[str, ...] = harness.option(
        ("none",), "dropped-block estimates each selector variant runs with (BAConfig.tail): 'pooled' adds a "
                   "'<selector>+tail@<sparsity>' row beside each selector row", choices=("none", "pooled"))
    implementation: str = harness.option("auto", "baatt.attention implementation (auto: the best available)")
    num_examples: int = harness.option(16, "passkey and multi-key NIAH examples per length")
    batch_tokens: int = harness.option(32768, "tokens per forward pass of the evaluation (rows = this / length)")
    compile_threads: int = harness.option(8, "evaluation forward passes compiled ahead at once")
    deadline_s: float = harness.option(
        540.0, "start no evaluation variant after this many seconds from the start (compilations under way finish)")
    reference_results: tuple[str, ...] = harness.option(
        ("experiments/results/dlm/dlm_run17_seeds/seed*_eval.json",),
        "eval_dlm results of the from-scratch models (glob patterns) whose dense masked NLL is listed beside")
    out: str = harness.option(harness.study_dir("smollm2_dlm"), "output folder")
    name: str = harness.option("smollm2_dlm", "output file stem")
    prepare_only: bool = harness.option(
        False, "only build the token streams of the run (.data/tokens/smollm2 for SmolLM2) and exit")


PRESETS = {
    "gpu": Config(),
    # CPU smoke run and tests: a tiny random GGUF with a byte-level tokenizer, 3 steps, one short length.
    "cpu_smoke": Config(
        preset="cpu_smoke", train=adapt.PRESETS["cpu_smoke"], dtype="float32", max_documents=40, ppl_seqs=2,
        ppl_len=256, lengths=(512,), sparsities=(0.5,), selectors=("baatt", "meanpool", "oracle"), block_size=64,
        num_examples=2, batch_tokens=1024, compile_threads=1, deadline_s=600.0, name="smollm2_dlm_cpu_smoke"),
}


def get_config(preset: str = "gpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------- the tiny GGUF of smoke runs

SMOKE_MODEL = dict(layers=2, d_model=64, heads=4, kv_heads=2, head_dim=16, mlp=128, context=2048)


def write_smoke_gguf(path, *, seed: int = 0) -> Path:
    """A tiny random Llama GGUF with SmolLM2's kind of tokenizer (byte-level BPE, digits split, its
    control tokens first) and a handful of merges: CPU smoke runs and tests of the adaptation."""
    from tokenizers import pre_tokenizers

    s = SMOKE_MODEL
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m.split()) for m in merges]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    rng = np.random.default_rng(seed)
    d, hd, vocab = s["d_model"], s["head_dim"], len(tokens)

    def normal(*shape, scale):
        return np.ascontiguousarray(rng.standard_normal(shape) * scale, np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(s["layers"])
    writer.add_context_length(s["context"])
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(s["mlp"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(100_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hd)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", normal(vocab, d, scale=0.1))  # tied head: logits of about unit scale
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(s["layers"]):
        for name, shape in (("attn_q", (s["heads"] * hd, d)), ("attn_k", (s["kv_heads"] * hd, d)),
                            ("attn_v", (s["kv_heads"] * hd, d)), ("attn_output", (d, s["heads"] * hd)),
                            ("ffn_gate", (s["mlp"], d)), ("ffn_up", (s["mlp"], d)), ("ffn_down", (d, s["mlp"]))):
            writer.add_tensor(f"blk.{i}.{name}.weight", normal(*shape, scale=shape[1] ** -0.5))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# ----------------------------------------------------------------------------- compiled forward passes


class Scorer:
    """Forward passes of one model (its weights replaceable) under many attention plans and shapes.

    ``scorer(plan, inputs, targets, scored)`` -> (sum of the CE of ``targets`` at the ``scored``
    positions, their number, argmax predictions [B, L], mean density over layers). Predictions
    and CE cover the ids below ``vocab_limit`` (the real vocabulary: no mask, no padding).
    ``prepare`` lowers here and compiles in a thread pool, so that compilation (host-bound, a few
    seconds per program) overlaps with the passes already compiled.
    """

    def __init__(self, model, *, vocab_limit: int, threads: int = 1):
        self.graphdef, self.state = nnx.split(model)
        self.vocab_limit = vocab_limit
        self.pool = ThreadPoolExecutor(max(1, threads))
        self.compiled: dict = {}

    def set_model(self, model) -> None:
        """Replace the weights (same structure: the compiled programs stay valid)."""
        graphdef, self.state = nnx.split(model)
        if graphdef != self.graphdef:
            raise ValueError("set_model needs a model of the structure the scorer was built for")

    def _function(self, plan):
        graphdef, vocab_limit = self.graphdef, self.vocab_limit

        def score(state, inputs, targets, scored):
            logits, aux = nnx.merge(graphdef, state)(inputs, attention=plan, return_aux=True)
            logits = logits[..., :vocab_limit].astype(jnp.float32)
            target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            ce = jnp.where(scored, jax.nn.logsumexp(logits, axis=-1) - target_logit, 0.0)
            density = jnp.mean(jnp.stack([jnp.mean(d) for d in aux["density"]]))
            return jnp.sum(ce), jnp.sum(scored), jnp.argmax(logits, axis=-1).astype(jnp.int32), density

        return jax.jit(score)

    def prepare(self, plan: AttentionPlan, batch: int, length: int):
        """Start compiling the pass of ``plan`` on [batch, length] inputs (once); returns its future."""
        key = (plan, batch, length)
        if key not in self.compiled:
            ids, flags = (jax.ShapeDtypeStruct((batch, length), dtype) for dtype in (jnp.int32, jnp.bool_))
            try:
                lowered = self._function(plan).lower(self.state, ids, ids, flags)
            except Exception as e:  # noqa: BLE001  (raised where the pass is used, like a compilation error)
                self.compiled[key] = Future()
                self.compiled[key].set_exception(e)
            else:
                self.compiled[key] = self.pool.submit(lowered.compile)
        return self.compiled[key]

    def __call__(self, plan, inputs, targets, scored):
        fn = self.prepare(plan, *inputs.shape).result()
        ce, n, pred, density = fn(self.state, jnp.asarray(inputs, jnp.int32), jnp.asarray(targets, jnp.int32),
                                  jnp.asarray(scored, bool))
        return float(ce), int(n), np.asarray(pred), float(density)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def causal_perplexity(model, tokens) -> dict:
    """Next-token NLL (nats per token) and perplexity of a causal model on tokens [B, L]."""
    tokens = np.asarray(tokens, np.int32)
    scorer = Scorer(model, vocab_limit=model.cfg.vocab_size)
    scored = np.ones(tokens.shape, bool)
    scored[:, -1] = False  # the last position has no next token
    ce, n, _, _ = scorer(AttentionPlan.dense(), tokens, np.roll(tokens, -1, axis=1), scored)
    scorer.close()
    return dict(nll=ce / n, perplexity=float(np.exp(ce / n)), tokens=n)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class LengthInputs:
    """What every variant is scored on at one length: masked text (same masks for all) and task examples."""

    length: int
    batch: int
    text: np.ndarray  # [batch, length]
    noisy_text: dict  # masking ratio -> (inputs, masked)
    examples: dict  # task kind -> [TaskExample]


def length_inputs(length: int, batch: int, val, tokenizer, mask_id: int, num_examples: int) -> LengthInputs:
    rng = np.random.default_rng(length)
    text = corpus.packed_batch(val, rng, batch, length)
    key = jax.random.PRNGKey(length)
    noisy = {}
    for t in NLL_RATIOS:
        inputs, masked, _ = forward_process(key, jnp.asarray(text), mask_id=mask_id, t=t)
        noisy[t] = (np.asarray(inputs), np.asarray(masked))
    examples = {kind: [tasks.make_example(kind, rng, val, tokenizer, length) for _ in range(num_examples)]
                for kind in TASK_KINDS}
    return LengthInputs(length, batch, text, noisy, examples)


def task_accuracy(scorer, plan, examples, batch: int, mask_id: int) -> tuple[float, float]:
    """(exact-match accuracy, mean density): each answer span masked, all its tokens from one pass."""
    hits, densities = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # a full batch: one compiled shape
        tokens = np.stack([e.tokens for e in padded])
        inputs, scored = tokens.copy(), np.zeros(tokens.shape, bool)
        for j, e in enumerate(padded):
            inputs[j, e.answer_start : e.answer_end] = mask_id
            scored[j, e.answer_start : e.answer_end] = True
        _, _, pred, density = scorer(plan, inputs, tokens, scored)
        hits += [bool(np.all(pred[j, e.answer_start : e.answer_end] == e.answer_tokens)) for j, e in enumerate(chunk)]
        densities.append(density)
    return sum(hits) / max(len(hits), 1), float(np.mean(densities))


def evaluate(scorer, plan, data: LengthInputs, mask_id: int, bytes_per_token: float) -> dict:
    """Masked NLL (per token and per byte, by ratio), task accuracies and density of one variant at one length."""
    by_t, densities = {}, []
    for t, (inputs, masked) in data.noisy_text.items():
        ce, n, _, density = scorer(plan, inputs, data.text, masked)
        by_t[f"t={t}"] = ce / max(n, 1)
        densities.append(density)
    row = dict(nll=float(np.mean(list(by_t.values()))), nll_by_t=by_t)
    row["nll_per_byte"] = row["nll"] / bytes_per_token
    for kind in TASK_KINDS:
        acc, density = task_accuracy(scorer, plan, data.examples[kind], data.batch, mask_id)
        row[kind] = acc
        densities.append(density)
    row["density"] = float(np.mean(densities))
    return row


def selector_plan(selector: str, sparsity: float, block_size: int, implementation, tail: str = "none") -> AttentionPlan:
    """The plan of one selector at one sparsity (``baatt``: the paper's recipe; ``xattention``: stride 8), with
    the dropped-block estimate ``tail`` (BAConfig.tail)."""
    base = BAConfig(block_size=block_size, sparsity=sparsity, tail=tail)
    if selector == "baatt":
        return AttentionPlan.ba(base.replace(sort_q=True, sort_k=True, beta=1.0), compensate_layers=("first", "last"),
                                implementation=implementation)
    if selector == "xattention":
        return AttentionPlan.ba(base.replace(selector="xattention", xattn_stride=8), implementation=implementation)
    return AttentionPlan.ba(base.replace(selector=selector), implementation=implementation)


def selectors_to_run(requested) -> list[str]:
    """``requested`` (checked against the registry), or every registered selector but dense in SELECTOR_ORDER."""
    registered = [name for name in baatt.SELECTORS if name != "dense"]
    if requested is None:
        return [n for n in SELECTOR_ORDER if n in registered] + [n for n in registered if n not in SELECTOR_ORDER]
    unknown = [n for n in requested if n not in baatt.SELECTORS]
    if unknown:
        raise ValueError(f"selectors must be registered ones {tuple(baatt.SELECTORS)}; got {unknown}")
    return list(requested)


def variants(cfg: Config) -> list[tuple[int, str, str | None, float | None, AttentionPlan]]:
    """(length, variant name, selector, sparsity, plan) in evaluation order: dense at every length, then
    each selector at every length and sparsity, once per ``cfg.tails`` entry (``+tail`` in the name)."""
    implementation = None if cfg.implementation == "auto" else cfg.implementation
    out = [(length, "dense", None, None, AttentionPlan.dense()) for length in cfg.lengths]
    for selector in selectors_to_run(cfg.selectors):
        for length in cfg.lengths:
            for s in cfg.sparsities:
                for tail in cfg.tails:
                    name = f"{selector}{'' if tail == 'none' else '+tail'}@{s}"
                    out.append((length, name, selector, s,
                                selector_plan(selector, s, cfg.block_size, implementation, tail)))
    return out


def from_scratch_reference(patterns, streams: adapt.TokenStreams | None) -> dict:
    """Dense masked NLL of the from-scratch DLMs (eval_dlm results) per length, per GPT-2 token and per byte."""
    rows = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            for row in json.loads(Path(path).read_text()).get("rows", []):
                if row.get("variant") == "dense" and "nll" in row:
                    rows.append(dict(file=path, length=row["length"], nll=row["nll"], passkey=row.get("passkey")))
    bytes_per_token = None
    if streams is not None:
        try:
            gpt2_val = np.asarray(corpus.load_tokens("val", build=False))
        except FileNotFoundError:
            gpt2_val = None
        if gpt2_val is not None:
            bytes_per_token = streams.val_text_bytes / (gpt2_val.size - int(np.sum(gpt2_val == 50256)))
    for row in rows:
        row["nll_per_byte"] = None if bytes_per_token is None else row["nll"] / bytes_per_token
    return dict(rows=rows, gpt2_bytes_per_token=bytes_per_token)


# ----------------------------------------------------------------------------- report


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result) -> str:
    lines = [f"# SmolLM2-135M as a masked-diffusion LM ({harness.describe_run(result)})", ""]
    m = result.get("model", {})
    if m:
        lines.append(f"Model: {m['source']} ({m['params']:,} parameters), adapted to masked diffusion: bidirectional "
                     f"attention, mask token id {m['mask_id']} (mean-embedding initialisation), "
                     f"shifted logits {m['shift_logits']}.")
    ref = result.get("causal_reference")
    if ref:
        lines.append(f"Causal reference (before adaptation): perplexity {ref['perplexity']:.2f} "
                     f"({ref['nll']:.3f} nats per token, {ref['nll_per_byte']:.3f} per byte) on {ref['tokens']:,} "
                     "held-out tokens.")
    tr = result.get("training")
    if tr:
        lines.append(f"Training: {tr['steps']} steps in {tr['seconds']:.0f} s ({tr['tokens']:,} tokens), "
                     f"last logged loss {_fmt(tr.get('last_loss'))}; final check at {tr.get('eval_len')}: "
                     f"masked NLL {_fmt(tr.get('val_nll'))}, one-shot passkey {_fmt(tr.get('passkey_acc'))}.")
    lines += ["", "Masked NLL: mean CE per masked token at masking ratios 0.15 / 0.5 / 0.85 of held-out text (nats; "
              "per byte: divided by the bytes per token of the split). Accuracy: exact match of the answer, every "
              "token from one forward pass. Density: share of block pairs computed (1 = dense).", ""]
    lines.append("| L | variant | density | masked NLL | NLL / byte | passkey | multi-key NIAH |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in result.get("before_training", []) + result.get("rows", []):
        variant = row["variant"] + (" (step 0)" if row.get("step") == 0 else "")
        if "error" in row:
            lines.append(f"| {row['length']} | {variant} | - | - | - | - | {row['error'][:80]} |")
            continue
        lines.append(f"| {row['length']} | {variant} | {row['density']:.3f} | {row['nll']:.3f} | "
                     f"{row['nll_per_byte']:.3f} | {row['passkey']:.3f} | {row['multikey_niah']:.3f} |")
    measured = [r for r in result.get("rows", []) if "error" not in r and r["sparsity"] is not None]
    for metric, title in (("passkey", "Passkey accuracy"), ("multikey_niah", "Multi-key NIAH accuracy"),
                          ("nll", "Masked NLL")):
        lines += ["", *pivot(result.get("rows", []), measured, metric, title)]
    scratch = result.get("from_scratch", {}).get("rows", [])
    if scratch:
        lines += ["", f"From-scratch DLMs of `experiments/results/dlm` ({len({r['file'] for r in scratch})} models, "
                  "GPT-2 tokens), dense, range over the models:", "",
                  "| L | masked NLL per token | per byte | passkey |", "|---|---|---|---|"]
        for length in sorted({r["length"] for r in scratch}):
            at = [r for r in scratch if r["length"] == length]

            def span(key, at=at):
                values = [r[key] for r in at if r[key] is not None]
                return f"{min(values):.3f}-{max(values):.3f}" if values else "-"

            lines.append(f"| {length} | {span('nll')} | {span('nll_per_byte')} | {span('passkey')} |")
    if result.get("notes"):
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def pivot(rows, measured, metric: str, title: str) -> list[str]:
    """Markdown table of ``metric``: one line per selector, one column per (length, sparsity), dense first."""
    columns = sorted({(r["length"], r["sparsity"]) for r in measured})
    if not columns:
        return []
    dense = {r["length"]: r[metric] for r in rows if r["variant"] == "dense" and "error" not in r}
    label = lambda r: r["variant"].split("@")[0]  # the selector, with "+tail" where it ran with one
    cells = {(label(r), r["length"], r["sparsity"]): r[metric] for r in measured}
    lines = [f"{title} by selector (columns: length / sparsity):", "",
             "| selector | " + " | ".join(f"{harness.format_length(n)} / {s}" for n, s in columns) + " |",
             "|---|" + "---|" * len(columns),
             "| dense | " + " | ".join(_fmt(dense.get(n)) for n, _ in columns) + " |"]
    for selector in dict.fromkeys(label(r) for r in measured):
        lines.append(f"| {selector} | " + " | ".join(_fmt(cells.get((selector, n, s))) for n, s in columns) + " |")
    return lines


# ----------------------------------------------------------------------------- the run


def resolve_gguf(cfg: Config, scratch: Path) -> Path:
    """The GGUF to adapt: ``--gguf``, a tiny random one (cpu_smoke), or SmolLM2 (joined from its parts if needed)."""
    if cfg.gguf is not None:
        return Path(cfg.gguf)
    if cfg.preset == "cpu_smoke":
        return write_smoke_gguf(scratch / "smoke.gguf")
    return smollm2_gguf()


def load_adapted(path: Path, ckpt_dir: str | None, dtype: str = "bfloat16"):
    """(model, tokenizer, what the weights are, the longest row length trained on): the GGUF's causal LM
    adapted to masked diffusion with shifted logits, as ``main`` builds it, and ``ckpt_dir``'s trained weights
    (written by ``main``) restored into it."""
    reader = gguf.GGUFReader(path)
    tokenizer = GGUFTokenizer(reader)
    _, causal = load_gguf(reader, dtype=dtype)
    model = adapt.adapt_for_diffusion(causal, shift_logits=True)
    trained_len, weights = model.cfg.max_len, f"{path.name} adapted to diffusion, untrained"
    if ckpt_dir:
        meta = json.loads((Path(ckpt_dir) / "train_config.json").read_text())
        step = restore_weights(model, ckpt_dir)
        trained_len = max(stage[1] for stage in meta["train"]["stages"])
        weights = f"{path.name} adapted to diffusion, checkpoint {ckpt_dir} (step {step})"
    return model, tokenizer, weights, trained_len


def smollm2_gguf() -> Path:
    """SmolLM2's GGUF in the data dir, joined from its ``.data/carry/`` parts first if it is not there."""
    path = smollm2_path()
    if not path.is_file():
        subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "split_gguf.sh"), "join"],
                       check=True)
    return path


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS),
                               parsers={"stages": parse_stage}, not_on_cli=("model_overrides",))
    t_start = time.time()
    result = dict(harness.run_metadata(__spec__.name, argv), preset=cfg.preset, config=dataclasses.asdict(cfg),
                  before_training=[], rows=[], notes=[])

    def flush():
        harness.write_results(cfg.out, {f"{cfg.name}.json": result, f"{cfg.name}.md": markdown(result)})

    with tempfile.TemporaryDirectory() as scratch:
        path = resolve_gguf(cfg, Path(scratch))
        reader = gguf.GGUFReader(path)
        tokenizer = GGUFTokenizer(reader)
        own_cache = cfg.gguf is None and cfg.preset != "cpu_smoke" and cfg.max_documents is None
        streams = adapt.token_streams(tokenizer, cache_dir=adapt.smollm2_token_dir() if own_cache else None,
                                      max_documents=cfg.max_documents)
        if cfg.prepare_only:
            print(f"token streams of {path.name}: {streams.train.size:,} train, {streams.val.size:,} val tokens"
                  + (f" in {adapt.smollm2_token_dir()}" if own_cache else ""))
            return dict(train_tokens=int(streams.train.size), val_tokens=int(streams.val.size))
        _, causal = load_gguf(reader, dtype=cfg.dtype)
    bytes_per_token = streams.val_bytes_per_token

    ppl_tokens = corpus.packed_sequences(streams.val, cfg.ppl_len)[: cfg.ppl_seqs]
    ref = causal_perplexity(adapt.scanned(causal), ppl_tokens)
    result["causal_reference"] = dict(ref, nll_per_byte=ref["nll"] / bytes_per_token, length=cfg.ppl_len)
    print(json.dumps(dict(causal_reference=result["causal_reference"])), flush=True)

    model = adapt.adapt_for_diffusion(causal, shift_logits=cfg.shift_logits)
    del causal
    mask_id = model.cfg.mask_id
    result["model"] = dict(source=path.name, params=count_params(model), vocab_size=model.cfg.vocab_size,
                           mask_id=mask_id, shift_logits=cfg.shift_logits, dtype=cfg.dtype,
                           val_bytes_per_token=bytes_per_token)
    result["from_scratch"] = from_scratch_reference(cfg.reference_results, None if cfg.max_documents else streams)
    scorer = Scorer(model, vocab_limit=mask_id, threads=cfg.compile_threads)
    inputs: dict[int, LengthInputs] = {}

    def inputs_at(length):
        if length not in inputs:
            batch = max(1, cfg.batch_tokens // length)
            inputs[length] = length_inputs(length, batch, streams.val, tokenizer, mask_id, cfg.num_examples)
        return inputs[length]

    first = inputs_at(cfg.lengths[0])
    before = evaluate(scorer, AttentionPlan.dense(), first, mask_id, bytes_per_token)
    result["before_training"].append(dict(before, length=first.length, variant="dense", step=0))
    print(json.dumps(result["before_training"][-1]), flush=True)
    flush()

    res = train(cfg.train, model=model, tokenizer=tokenizer, train_stream=streams.train, val_stream=streams.val)
    history = res["history"]
    logged = [h for h in history if "loss" in h]  # one record every 10 steps, with the stage's row length
    final = [h for h in history if h.get("final")][-1]
    tokens_per_step = {s[1]: s[1] * s[2] for s in cfg.train.stages}
    tokens = sum((h["step"] - prev["step"]) * tokens_per_step[h["seq_len"]]
                 for prev, h in zip([dict(step=0)] + logged, logged))
    result["training"] = dict(
        steps=res["steps"], seconds=res["seconds"], tokens=tokens, last_loss=logged[-1]["loss"] if logged else None,
        val_nll=final.get("val_nll"), passkey_acc=final.get("passkey_acc"),
        eval_len=cfg.train.eval_len or cfg.train.stages[-1][1], history=history)
    scorer.set_model(res["model"])
    flush()

    todo = variants(cfg)
    lookahead = max(1, cfg.compile_threads)
    for i, (length, name, selector, sparsity, plan) in enumerate(todo):
        if time.time() - t_start > cfg.deadline_s:
            skipped = [f"{variant}@L={n}" for n, variant, *_ in todo[i:]]
            result["notes"].append(f"deadline of {cfg.deadline_s:.0f} s reached: skipped {', '.join(skipped)}")
            break
        # keep the compile threads busy with the next variants, but not in the last 30 s: a compilation under
        # way when the deadline comes still runs to its end before the process can exit
        if time.time() - t_start < cfg.deadline_s - 30:
            for ahead in todo[i : i + lookahead]:
                scorer.prepare(ahead[4], inputs_at(ahead[0]).batch, ahead[0])
        row = dict(length=length, variant=name, selector=selector, sparsity=sparsity)
        started = time.time()
        try:
            row.update(evaluate(scorer, plan, inputs_at(length), mask_id, bytes_per_token))
        except Exception as e:  # noqa: BLE001  (a failing selector is reported; the sweep goes on)
            row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            traceback.print_exc()
        row["seconds"] = time.time() - started
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        flush()
    scorer.close()
    result["seconds"] = time.time() - t_start
    flush()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
