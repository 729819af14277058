"""python -m experiments.sparse_prefill

Does SmolLM2-135M-Instruct still model text when every layer's causal attention is block-sparse?
Per selector row (with and without the forced sink block) and sparsity, the model runs with
``AttentionPlan.ba`` in all 30 layers under its causal mask, and this study reports:

- perplexity on two State of the Union addresses (2010 and 1995; public text SmolLM2 may have seen
  in pretraining, and nothing here tunes it) over the first 2K, 4K and 8K tokens;
- passkey and multi-key needle-in-a-haystack accuracy: the address text as haystack, one (or
  several, each for a named door) "The pass key is 12345. Remember it." needles at random depths,
  then "What is the pass key? The pass key is " (the question on a new line). A prompt is solved
  when greedy decoding writes the five digits, checked in the same forward pass: greedy decoding writes the answer exactly when,
  fed the answer, every one of its tokens is the argmax at its position (teacher forcing).
  Dense accuracy comes first; selector rows are reported only for the prompt kinds and lengths
  the dense model solves (``--min-dense-accuracy``).

One compiled forward per (row, sparsity): every text window and every prompt is a row of one
batch of ``--length`` tokens. A causal model's prediction at position i depends on tokens up to i
only, and a selection under the causal mask keeps, for each query block, a fraction of the key
blocks it may see, so the perplexity of the first n tokens and a prompt of n tokens followed by
filler text score as n-token inputs would (up to what a selector's estimate takes from later
queries: the rows here estimate each query block from its own queries and earlier keys).

Row switches: ``--sinks``, ``--local-windows``, ``--tails`` (each a row per value) and ``--head-budgets``
(a twin of every row whose per-(layer, head) budgets, ``baatt.selection.calibrate``, spend the row's own
kept share of the allowed blocks; calibrated on ``--calibration-document``, by default the first of
``--documents``). Forced blocks widen short rows' budgets, so each row also reports the share of the
allowed block pairs it keeps, from its selection.

CPU smoke preset (``--preset smoke``): 512 tokens, two rows, one sparsity. GPU (bf16, 8K tokens):
``--preset gpu``, split by ``--selectors`` into parts that each stay under five minutes on an H100,
then ``--merge`` of the parts' folders (experiments/results/sparse_prefill/README.md has the
commands). Needs the SmolLM2 GGUF (``bash scripts/setup_data.sh``). Writes ``results.json``,
``table.md`` and ``perplexity.png`` to ``--out`` (default ``experiments/results/sparse_prefill/``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import baatt
from baatt.data import data_dir
from baatt.nn import AttentionPlan, capture_qkv, load_smollm2
from baatt.selection.calibrate import calibrate_budgets, kept_share
from experiments import harness

SELECTORS = ("meanpool", "baatt", "xattention", "mixed", "query_token", "quest", "proxy", "pooled_query", "oracle")
PRESETS = ("cpu", "smoke", "gpu")
DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "cpu"
    length: int = harness.option(2048, "tokens of every batch row (one compiled forward per row and sparsity)")
    prefixes: tuple[int, ...] = harness.option((1024, 2048), "perplexity over the first n tokens, each n")
    documents: tuple[str, ...] = harness.option(
        ("sotu/2010_barack_obama_d.txt", "sotu/1995_william_j_clinton_d.txt"),
        "held-out texts for perplexity and haystacks, under <data dir>/raw/")
    selectors: tuple[str, ...] = harness.option(SELECTORS, "selectors, each run in every layer", choices=SELECTORS)
    sinks: tuple[bool, ...] = harness.option((False, True), "force the sink block off / on (each a row)")
    local_windows: tuple[int, ...] = harness.option((0,), "key blocks kept on each side of a query block's diagonal "
                                                    "(BAConfig.local_window; each a row, inside the budget)")
    tails: tuple[str, ...] = harness.option(("none",), "pooled estimate of the dropped blocks (BAConfig.tail; each "
                                            "a row)", choices=("none", "pooled"))
    tail_group: int | None = harness.option(None, "tokens per pooled key of the tail rows; none: one per key block")
    head_budgets: bool = harness.option(False, "add a twin of every row with per-(layer, head) budgets at the same "
                                        "density, calibrated on the first --length tokens of --calibration-document")
    calibration_document: str | None = harness.option(
        None, "text under <data dir>/raw/ whose Q/K calibrate the per-head budgets (one not in --documents keeps "
        "the calibration out of sample); none: the first of --documents")
    sparsities: tuple[float, ...] = harness.option((0.5, 0.7, 0.9), "fixed-budget sparsities")
    block_size: int = harness.option(64, "query and key block size")
    passkey_lengths: tuple[int, ...] = harness.option((1024, 2048), "prompt lengths of the needle tasks")
    needles: tuple[int, ...] = harness.option((1, 4), "needles per prompt: 1 is the passkey task, more is multi-key")
    trials: int = harness.option(4, "prompts per needle count and length (random depths and keys)")
    min_dense_accuracy: float = harness.option(0.75, "report a task's selector rows only where dense reaches this")
    dtype: str = harness.option("float32", "compute dtype (bfloat16 on a GPU)", choices=("float32", "bfloat16"))
    seed: int = harness.option(0, "seed of the needles' depths and keys")
    merge: tuple[str, ...] = harness.option((), "folders of runs (parts split by --selectors) to combine into "
                                            "one table and plot, instead of running the model")
    out: str = harness.option(harness.study_dir("sparse_prefill"), "output folder")

    @property
    def calibration_text(self) -> str:
        """The text whose first ``length`` tokens calibrate the per-head budgets."""
        return self.calibration_document or self.documents[0]


def get_config(preset: str = "cpu", **overrides) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}; got {preset!r}")
    base = Config(preset=preset)
    if preset == "smoke":
        base = dataclasses.replace(base, length=512, prefixes=(256, 512), selectors=("meanpool", "mixed"),
                                   sinks=(False,), sparsities=(0.5,), passkey_lengths=(512,), needles=(1,), trials=2)
    elif preset == "gpu":
        base = dataclasses.replace(base, length=8192, prefixes=(2048, 4096, 8192),
                                   passkey_lengths=(2048, 4096, 8192), trials=4, dtype="bfloat16")
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A needle prompt as one batch row: ``tokens`` of the full row length, the answer at ``answer``."""

    tokens: np.ndarray
    answer: slice
    needles: int
    length: int  # the prompt's own tokens; the rest of the row is filler text the answer cannot see


def needle_prompt(tokenizer, haystack: list[int], *, length: int, row_length: int, needles: int,
                  rng: np.random.Generator) -> Prompt:
    """``needles`` key sentences at random depths of the haystack, then the question and the answer, in
    ``length`` tokens; filler text pads the row to ``row_length``."""
    keys = [int(rng.integers(10_000, 100_000)) for _ in range(needles)]
    doors = list(rng.choice(DOORS, size=needles, replace=False))
    if needles == 1:
        sentences = [f" The pass key is {keys[0]}. Remember it."]
        question = "\n\nWhat is the pass key? The pass key is"
        asked = 0
    else:
        sentences = [f" The pass key of the {d} door is {k}. Remember it." for d, k in zip(doors, keys)]
        asked = int(rng.integers(needles))
        question = f"\n\nWhat is the pass key of the {doors[asked]} door? The pass key of the {doors[asked]} door is"
    needle_ids = [tokenizer.encode(s) for s in sentences]
    question_ids, answer_ids = tokenizer.encode(question), tokenizer.encode(f" {keys[asked]}")
    # The tokenizer writes " 12345" as a space token and one token per digit: the space ends the prompt
    # ("... The pass key is "), so that the answer greedy decoding has to write is the five digits.
    while not tokenizer.decode(answer_ids[:1]).strip():
        question_ids, answer_ids = question_ids + answer_ids[:1], answer_ids[1:]
    fill = length - len(question_ids) - len(answer_ids) - sum(map(len, needle_ids))
    if fill < needles or len(haystack) < fill + row_length - length:
        raise ValueError(f"passkey_lengths entries must leave room for the haystack; got {length}")
    depths = sorted(rng.choice(np.arange(1, fill), size=needles, replace=False))
    ids, start = [], 0
    for depth, needle in zip(depths, needle_ids):
        ids += haystack[start:depth] + needle
        start = depth
    ids += haystack[start:fill] + question_ids
    answer = slice(len(ids), len(ids) + len(answer_ids))
    ids += answer_ids
    ids += haystack[fill:fill + row_length - len(ids)]
    return Prompt(np.asarray(ids[:row_length], np.int32), answer, needles, length)


@nnx.jit(static_argnames=("plan",))
def _score(model, tokens, *, plan):
    """Per position i < L - 1: the negative log-likelihood of token i + 1 and whether it is the argmax
    (float32 [B, L - 1] each). The head runs one row at a time to bound the logits' memory."""
    hidden = model.hidden(tokens, attention=plan)

    def row(args):
        h, target = args
        logits = model.logits(h[:-1]).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, target[1:, None], axis=-1)[:, 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return nll, (jnp.argmax(logits, axis=-1) == target[1:]).astype(jnp.float32)

    return jax.lax.map(row, (hidden, tokens))


def effective_sparsity(config: baatt.BAConfig, length: int) -> float:
    """The share of the allowed block pairs a ``length``-token row does not keep under ``config``: the
    nominal sparsity unless forced blocks (sink, local window, diagonal) widen short rows' budgets. Its
    budget rule does not depend on the data, so one random head measures it."""
    x = jax.random.normal(jax.random.key(0), (1, length, 1, 16), jnp.float32)
    selection = baatt.select_blocks(x, x, config)
    allowed, _ = config.mask.block_pairs(length, length, config.block_q, config.block_k)
    return 1.0 - float(np.sum(np.asarray(selection.counts))) / float(np.sum(allowed))


def row_label(selector: str, sink: bool, local_window: int = 0, tail: str = "none") -> str:
    return (selector + (" + sink" if sink else "") + (f" + local {local_window}" if local_window else "")
            + (" + tail" if tail != "none" else ""))


def run(cfg: Config, argv=None) -> dict:
    t0 = time.time()
    if max(cfg.prefixes) > cfg.length or max(cfg.passkey_lengths, default=0) > cfg.length:
        raise ValueError(f"prefixes and passkey_lengths must be at most length={cfg.length}")
    if cfg.calibration_document is not None and not (data_dir() / "raw" / cfg.calibration_document).is_file():
        raise ValueError(f"calibration_document must be a file under {data_dir() / 'raw'}; got "
                         f"{cfg.calibration_document!r}")
    _, model, tokenizer = load_smollm2(progress=False, dtype=cfg.dtype)
    encode = lambda doc: tokenizer.encode((data_dir() / "raw" / doc).read_text())  # noqa: E731
    texts = [encode(doc) for doc in cfg.documents]
    for doc, ids in zip(cfg.documents, texts):
        if len(ids) < cfg.length + 1:
            raise ValueError(f"length must be below {doc}'s {len(ids)} tokens; got {cfg.length}")
    rows = [np.asarray(ids[: cfg.length], np.int32) for ids in texts]
    calibration_row = rows[0]
    if cfg.head_budgets and cfg.calibration_document is not None:
        ids = encode(cfg.calibration_document)
        if len(ids) < cfg.length:
            raise ValueError(f"calibration_document must have at least length={cfg.length} tokens; "
                             f"{cfg.calibration_document} has {len(ids)}")
        calibration_row = np.asarray(ids[: cfg.length], np.int32)
    rng = np.random.default_rng(cfg.seed)
    prompts = [needle_prompt(tokenizer, texts[t % len(texts)], length=n, row_length=cfg.length, needles=k, rng=rng)
               for n in cfg.passkey_lengths for k in cfg.needles for t in range(cfg.trials)]
    tokens = jnp.asarray(np.stack(rows + [p.tokens for p in prompts]))

    def evaluate(plan: AttentionPlan) -> dict:
        nll, correct = (np.asarray(x) for x in _score(model, tokens, plan=plan))
        ppl = {str(n): float(math.exp(np.mean(nll[: len(rows), : n - 1]))) for n in cfg.prefixes}
        per_doc = {doc: {str(n): float(math.exp(np.mean(nll[i, : n - 1]))) for n in cfg.prefixes}
                   for i, doc in enumerate(cfg.documents)}
        solved: dict[str, list[bool]] = {}
        for p, hits in zip(prompts, correct[len(rows):]):
            # the answer's tokens sit at positions answer.start.., predicted from the positions before
            hit = bool(np.all(hits[p.answer.start - 1: p.answer.stop - 1]))
            solved.setdefault(f"{p.needles}x{p.length}", []).append(hit)
        return dict(perplexity=ppl, per_document=per_doc,
                    accuracy={task: float(np.mean(v)) for task, v in solved.items()})

    dense = evaluate(AttentionPlan.dense())
    workdir = tempfile.TemporaryDirectory() if cfg.head_budgets else None
    if workdir is not None:  # every layer's Q/K of the calibration text, kept on disk until needed
        captured = capture_qkv(model, jnp.asarray(calibration_row[None]), out_dir=workdir.name)
        samples = {layer: (a["q"], a["k"]) for layer, a in captured.items()}
    solved_tasks = [t for t, acc in dense["accuracy"].items() if acc >= cfg.min_dense_accuracy]
    results = []
    jobs = list(itertools.product(cfg.selectors, cfg.sinks, cfg.local_windows, cfg.tails, cfg.sparsities))
    for selector, sink, window, tail, s in tqdm(jobs, desc="row x sparsity", unit="forward", file=sys.stdout):
        config = baatt.BAConfig(block_size=cfg.block_size, sparsity=s, selector=selector, force_sink=sink,
                                local_window=window, tail=tail, tail_group=cfg.tail_group if tail != "none" else None)
        got = evaluate(AttentionPlan.ba(config))
        causal = config.replace(mask=baatt.AttentionMask.causal())  # the mask every layer of the model applies
        got["effective_sparsity"] = {str(n): effective_sparsity(causal, n) for n in cfg.prefixes}
        got["accuracy"] = {t: a for t, a in got["accuracy"].items() if t in solved_tasks}
        label = row_label(selector, sink, window, tail)
        results.append(dict(selector=selector, sink=sink, local_window=window, tail=tail, label=label, sparsity=s,
                            **got))
        if cfg.head_budgets:
            row_sparsity = (got["effective_sparsity"][str(cfg.length)] if cfg.length in cfg.prefixes
                            else effective_sparsity(causal, cfg.length))
            start = time.time()
            budgets = calibrate_budgets(samples, causal, target_density=1.0 - row_sparsity)
            seconds = time.time() - start
            twin = evaluate(AttentionPlan.ba(config, budgets=budgets))
            twin["effective_sparsity"] = {str(n): 1.0 - kept_share(np.asarray(budgets.counts), causal, length_q=n,
                                                                   length_k=n) for n in cfg.prefixes}
            twin["accuracy"] = {t: a for t, a in twin["accuracy"].items() if t in solved_tasks}
            results.append(dict(selector=selector, sink=sink, local_window=window, tail=tail, label=label + ", per head",
                                sparsity=s, head_budgets=dict(counts=budgets.counts, target=budgets.target,
                                                              calibration_s=round(seconds, 1),
                                                              calibrated_on=cfg.calibration_text), **twin))
    if workdir is not None:
        workdir.cleanup()
    meta = harness.run_metadata(
        __spec__.name, argv, seconds=round(time.time() - t0, 1), config=dataclasses.asdict(cfg),
        model="SmolLM2-135M-Instruct (GGUF Q4_1)", device_count=jax.device_count(), batch_rows=int(tokens.shape[0]))
    return dict(meta=meta, dense=dense, solved_tasks=solved_tasks, results=results)


def merge_parts(folders: tuple[str, ...]) -> dict:
    """One result from runs of the same configuration but different ``--selectors``: the first run's dense
    row and metadata (with every part's), every part's selector rows."""
    parts = [json.loads((Path(folder) / "results.json").read_text()) for folder in folders]
    first = parts[0]
    for folder, part in zip(folders, parts):
        if part["dense"]["perplexity"] != first["dense"]["perplexity"]:
            raise ValueError(f"merge: {folder} ran another configuration than {folders[0]} (dense perplexity differs)")
    meta = dict(first["meta"], parts=[p["meta"] for p in parts], seconds=sum(p["meta"]["seconds"] for p in parts))
    return dict(meta=meta, dense=first["dense"], solved_tasks=first["solved_tasks"],
                results=[r for p in parts for r in p["results"]])


def _task_name(task: str) -> str:
    needles, length = task.split("x")
    kind = "passkey" if needles == "1" else f"{needles}-key"
    return f"{kind} {harness.format_length(int(length))}"


def write_table(results: dict, cfg: Config) -> str:
    meta, dense = results["meta"], results["dense"]
    pct = lambda s: f"{int(round(s * 100))}%"  # noqa: E731
    longest = harness.format_length(max(cfg.prefixes))
    lines = [
        f"{meta['model']}, every layer sparse under the causal mask, block {cfg.block_size}, {cfg.dtype}; "
        f"{harness.describe_run(meta)}.",
        "",
        "Perplexity: exp of the mean next-token loss over the first n tokens of "
        + ", ".join(cfg.documents) + " (pooled). Needle tasks: share of prompts whose answer greedy decoding "
        f"writes ({cfg.trials} prompts each)."
        + (f" Per-head budgets calibrated on the first {cfg.length} tokens of "
           f"{cfg.calibration_text}." if cfg.head_budgets else ""),
        "",
        "| attention | sparsity | " + " | ".join(f"ppl {harness.format_length(n)}" for n in cfg.prefixes)
        + f" | ppl {longest} vs dense | kept share of allowed blocks, {longest} |",
        "|---|---|" + "---|" * (len(cfg.prefixes) + 2),
        "| dense | 0% | " + " | ".join(f"{dense['perplexity'][str(n)]:.2f}" for n in cfg.prefixes) + " | - | 1.00 |",
    ]
    top = str(max(cfg.prefixes))
    for r in results["results"]:
        effective = r.get("effective_sparsity", {}).get(top)  # absent from older runs
        lines.append(f"| {r['label']} | {pct(r['sparsity'])} | "
                     + " | ".join(f"{r['perplexity'][str(n)]:.2f}" for n in cfg.prefixes)
                     + f" | {100 * (r['perplexity'][top] / dense['perplexity'][top] - 1):+.2f}%"
                     + (f" | {1 - effective:.3f} |" if effective is not None else " | - |"))
    tasks = list(dense["accuracy"])
    if tasks:
        lines += ["", "Dense needle accuracy: " + ", ".join(f"{_task_name(t)} {dense['accuracy'][t]:.2f}" for t in tasks)
                  + "."]
        solved = results["solved_tasks"]
        unsolved = [t for t in tasks if t not in solved]
        if unsolved:
            lines.append(f"Dense attention solves fewer than {cfg.min_dense_accuracy:.0%} of the prompts of "
                         + ", ".join(map(_task_name, unsolved)) + ": no selector rows for those.")
        if solved:
            lines += ["", "| attention | sparsity | " + " | ".join(map(_task_name, solved)) + " |",
                      "|---|---|" + "---|" * len(solved),
                      "| dense | 0% | " + " | ".join(f"{dense['accuracy'][t]:.2f}" for t in solved) + " |"]
            for r in results["results"]:
                lines.append(f"| {r['label']} | {pct(r['sparsity'])} | "
                             + " | ".join(f"{r['accuracy'][t]:.2f}" for t in solved) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, cfg: Config):
    """Perplexity over the longest prefix against sparsity, one line per row, dense as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = str(max(cfg.prefixes))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = dict.fromkeys(r["label"] for r in results["results"])
    for label in labels:
        rs = sorted((r for r in results["results"] if r["label"] == label), key=lambda r: r["sparsity"])
        ax.plot([100 * r["sparsity"] for r in rs], [r["perplexity"][n] for r in rs], marker="o",
                linestyle="--" if " + sink" in label else "-", label=label)
    ax.axhline(results["dense"]["perplexity"][n], color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%) in every layer")
    ax.set_ylabel(f"perplexity, first {harness.format_length(int(n))} tokens")
    ax.set_title("SmolLM2-135M, block-sparse causal prefill")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=PRESETS)
    if cfg.merge:
        results = merge_parts(cfg.merge)
        ran = {k: tuple(v) if isinstance(v, list) else v for k, v in results["meta"]["config"].items()}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in ran.items() if k not in ("merge", "out")})
    else:
        results = run(cfg, argv)
    table = write_table(results, cfg)
    harness.report_study(cfg.out, results, table, {"perplexity.png": plot(results, cfg)})
    return results


if __name__ == "__main__":
    main()
