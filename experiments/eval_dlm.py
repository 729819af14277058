"""python -m experiments.eval_dlm --ckpt-dir .ckpt/dlm_small --lengths 4096 2048 8192

Evaluate a trained DLM under dense attention and block-sparse selectors. Or one process per
length (compilation is host-bound: they overlap), then one table of them all:
``python -m experiments.eval_dlm --merge a.json b.json c.json --name dlm_eval``.

For each sequence length and attention variant: masked-token NLL (mean CE per
masked token at masking ratios 0.15/0.5/0.85 on held-out packed text, same
masks for every variant) and passkey / multi-key NIAH accuracy (answer span
masked, filled by the LLaDA sampler: greedy, low-confidence remasking, one
token per step, exact match; ``--task-decode oneshot``: all answer tokens from one
forward pass, as the training-time check), with the density (fraction of block pairs
computed) that each variant actually used.

Variants: dense (cuDNN/XLA); ``baatt`` (the paper's recipe: norm sorting of Q
and K, compensation with beta=1 in the first and last layers only); ``baatt_ns``
(no sorting, compensation first/last, beta=0.5); ``meanpool``; ``xattention``
(stride 8, same top-k budget); then every other registered selector with its defaults, as
``<selector>@<sparsity>`` (``last_query``, ``pooled_query``, ``oracle``, ``max_oracle``, ...), each at
50/70/90% sparsity, block size 128; and ``last_query_q32`` (``last_query`` scoring 32 queries, under 1%
of dense FLOPs from 2K tokens on). A selector that is missing or fails is reported as such, not
silently dropped.
Writes ``<name>.json`` and ``<name>.md`` (device, jax version, commit, date) under ``--out``
(default ``experiments/results/dlm/``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from baatt.config import BAConfig
from baatt.data import corpus, tasks
from baatt.data.tokenizer import get_tokenizer
from baatt.diffusion import generate
from baatt.diffusion.masking import forward_process, masked_ce
from baatt.nn import AttentionPlan
from baatt.selector_registry import SELECTORS
from baatt.train import accuracy_split, load_model
from experiments import harness


@dataclasses.dataclass(frozen=True)
class Config:
    ckpt_dir: str | None = harness.option(None, "checkpoint folder (train_dlm's --ckpt-dir); needed unless --merge")
    merge: tuple[str, ...] | None = harness.option(
        None, "instead of evaluating: merge the rows of these result files (e.g. one process per length) "
              "into <out>/<name>.json/.md")
    lengths: tuple[int, ...] = harness.option((4096, 2048, 8192), "sequence lengths")
    sparsities: tuple[float, ...] = harness.option((0.5, 0.7, 0.9), "fixed-budget sparsities of the sparse variants")
    num_examples: int = harness.option(16, "task examples per task and length")
    nll_seqs: int = harness.option(8, "held-out sequences for the masked NLL")
    batch: int = harness.option(8, "task examples decoded at once")
    block_size: int = harness.option(128, "block size of the sparse variants")
    task_decode: str = harness.option(
        "sampler", "answer decoding for task accuracy: the LLaDA sampler (one token per step) or one forward pass",
        choices=("sampler", "oneshot"))
    implementation: str = harness.option("reference", "baatt.attention implementation (auto: the best available)")
    only: tuple[str, ...] | None = harness.option(None, "variant name prefixes to run, in this order (none: all)")
    time_budget: float | None = harness.option(None, "skip remaining work after this many seconds")
    out: str = harness.option(harness.study_dir("dlm"), "output folder")
    name: str = harness.option("dlm_eval", "output file stem")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


# Registered selectors that have a variant of their own above (or none: dense is its own row).
_NAMED_VARIANTS = ("dense", "baatt", "meanpool", "xattention")


def variants(sparsities, block_size, implementation):
    out = {"dense": AttentionPlan.dense()}
    have_x = importlib.util.find_spec("baatt.selection.xattention") is not None
    for s in sparsities:
        base = BAConfig(block_size=block_size, sparsity=s)
        out[f"baatt@{s}"] = AttentionPlan.ba(base.replace(sort_q=True, sort_k=True, beta=1.0),
                                             compensate_layers=("first", "last"), implementation=implementation)
        out[f"baatt_ns@{s}"] = AttentionPlan.ba(base.replace(beta=0.5), compensate_layers=("first", "last"),
                                                implementation=implementation)
        out[f"meanpool@{s}"] = AttentionPlan.ba(base.replace(selector="meanpool"), implementation=implementation)
        out[f"xattention@{s}"] = (AttentionPlan.ba(base.replace(selector="xattention", xattn_stride=8),
                                                   implementation=implementation) if have_x else None)
    for name in SELECTORS:  # the rest of the registry, each with its own defaults
        if name not in _NAMED_VARIANTS:
            for s in sparsities:
                out[f"{name}@{s}"] = AttentionPlan.ba(BAConfig(block_size=block_size, sparsity=s, selector=name),
                                                      implementation=implementation)
    if "last_query" in SELECTORS:
        # 32 scored queries instead of 64: the estimate stays under 1% of dense FLOPs from 2K tokens on
        # (64 / (2 * 2048) = 1.56% at 2K; experiments.selector_flops).
        for s in sparsities:
            out[f"last_query_q32@{s}"] = AttentionPlan.ba(
                BAConfig(block_size=block_size, sparsity=s, selector="last_query", last_query_size=32),
                implementation=implementation)
    return out


def only_variants(vs: dict, prefixes) -> dict:
    """The variants whose names start with one of ``prefixes``, in the order the prefixes are given (so that
    ``--time-budget`` skips the last named first); a prefix's matches keep their own order."""
    picked = {}
    for prefix in prefixes:
        matches = [k for k in vs if k.startswith(prefix)]
        if not matches:
            raise ValueError(f"--only: {prefix!r} is the prefix of no variant; the variants are {', '.join(vs)}")
        picked.update({k: vs[k] for k in matches if k not in picked})
    return picked


_CE = jax.jit(lambda logits, toks, masked: (jnp.sum(masked_ce(logits, toks, masked)), jnp.sum(masked)))


def eval_nll(model, plan, tokens, key):
    from flax import nnx

    from baatt.diffusion.sampler import _forward

    gd, st = nnx.split(model)
    mode = "plain" if plan.kind == "dense" else "estimate"
    f = _forward(gd, plan, mode)
    res, dens = {}, []
    for t in (0.15, 0.5, 0.85):
        noisy, masked, _ = forward_process(key, jnp.asarray(tokens), mask_id=model.cfg.mask_id, t=t)
        logits, aux = f(st, noisy)
        s, n = _CE(logits, jnp.asarray(tokens), masked)
        res[f"t={t}"] = float(s / n)
        dens.append(1.0 if aux is None else float(aux[1]))
    res["nll"] = float(np.mean(list(res.values())))
    res["density"] = float(np.mean(dens))
    return res


def eval_task(model, plan, examples, batch, decode="sampler"):
    """Exact-match accuracy of the decoded answer span; examples grouped by answer length, groups padded to ``batch``.

    decode: "sampler" (LLaDA: one token per step, most confident first, low-confidence remasking) or
    "oneshot" (every answer token from one forward pass with the whole span masked).
    """
    groups: dict[int, list] = {}
    for e in examples:
        groups.setdefault(e.answer_end - e.answer_start, []).append(e)
    results, dens = [], []
    for alen, exs in sorted(groups.items()):
        for i in range(0, len(exs), batch):
            chunk = exs[i : i + batch]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch - real)
            canvas = np.stack([e.tokens for e in chunk]).copy()
            for j, e in enumerate(chunk):
                canvas[j, e.answer_start : e.answer_end] = model.cfg.mask_id
            r = generate(model, canvas, steps=alen if decode == "sampler" else 1, block_length=alen, plan=plan)
            results += [(e, r.tokens[j, e.answer_start : e.answer_end] == e.answer_tokens)
                        for j, e in enumerate(chunk[:real])]
            dens.append(r.mean_density)
    n = len(results)
    by_len = accuracy_split(results)["by_answer_tokens"]
    return dict(acc=sum(bool(np.all(hit)) for _, hit in results) / max(n, 1), n=n,
                density=float(np.mean(dens)) if dens else 1.0,
                by_answer_tokens={k: dict(acc=c / t, n=t) for k, (c, t) in by_len.items()})


def markdown(result) -> str:
    lines = [f"# DLM evaluation ({harness.describe_run(result)})", ""]
    lines.append(f"Model: {result['model']} step {result['step']}. Block size {result['block_size']}, implementation "
                 f"{result['implementation']}. NLL: mean CE per masked token (t = 0.15/0.5/0.85), held-out text. "
                 f"Accuracy: exact match of the answer decoded by the {result.get('task_decode', 'sampler')} "
                 f"({result['num_examples']} examples per task and length). "
                 "Density: fraction of block pairs computed (1 = dense).")
    lines.append("")
    lines.append("| L | variant | density | masked NLL | passkey acc | passkey acc by answer tokens | multi-key NIAH acc |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['length']} | {row['variant']} | - | - | - | - | {row['error'][:80]} |")
            continue
        split = ", ".join(f"{k}: {v['acc']:.2f} ({v['n']})" for k, v in sorted(row.get("passkey_by_answer_tokens", {}).items()))
        lines.append(f"| {row['length']} | {row['variant']} | {row['density']:.3f} | {row['nll']:.3f} | "
                     f"{row['passkey']:.3f} | {split or '-'} | {row['multikey_niah']:.3f} |")
    if result.get("notes"):
        lines += ["", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def merge(paths, out_dir: Path, name: str) -> dict:
    """One result from several eval_dlm results of the same checkpoint (rows and notes concatenated)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for p, r in zip(paths, parts):
        if (r["model"], r["step"], r["block_size"]) != (first["model"], first["step"], first["block_size"]):
            raise ValueError(f"--merge needs results of one checkpoint and block size; {p} differs from {paths[0]}")
    result = dict(first, rows=[row for r in parts for row in r["rows"]], notes=[n for r in parts for n in r["notes"]],
                  seconds=max(r.get("seconds", 0.0) for r in parts), merged_from=[str(p) for p in paths])
    harness.write_results(out_dir, {f"{name}.json": result, f"{name}.md": markdown(result)})
    print(markdown(result))
    return result


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    if cfg.merge:
        return merge(cfg.merge, Path(cfg.out), cfg.name)
    if not cfg.ckpt_dir:
        raise SystemExit("eval_dlm: --ckpt-dir is required (unless --merge is given)")
    t0 = time.time()
    model, meta = load_model(cfg.ckpt_dir)
    tok = get_tokenizer()
    val = corpus.load_tokens("val")
    vs = variants(cfg.sparsities, cfg.block_size, None if cfg.implementation == "auto" else cfg.implementation)
    if cfg.only:
        vs = only_variants(vs, cfg.only)
    result = dict(harness.run_metadata(__spec__.name, argv), model=meta["model"], step=meta["step"],
                  block_size=cfg.block_size, implementation=cfg.implementation, num_examples=cfg.num_examples,
                  task_decode=cfg.task_decode, rows=[], notes=[])
    if importlib.util.find_spec("baatt.selection.xattention") is None:
        result["notes"].append("xattention selector not present (baatt/selection/xattention.py missing): not run")

    def flush():
        harness.write_results(cfg.out, {f"{cfg.name}.json": result, f"{cfg.name}.md": markdown(result)})

    for length in cfg.lengths:
        rng = np.random.default_rng(length)
        nll_tokens = corpus.packed_batch(val, rng, cfg.nll_seqs, length)
        exs = {k: [tasks.make_example(k, rng, val, tok, length) for _ in range(cfg.num_examples)]
               for k in ("passkey", "multikey_niah")}
        key = jax.random.PRNGKey(length)
        for name, plan in vs.items():
            if cfg.time_budget and time.time() - t0 > cfg.time_budget:
                result["notes"].append(f"time budget reached: skipped {name} at L={length}")
                continue
            row = dict(length=length, variant=name)
            if plan is None:
                row["error"] = "selector not available"
                result["rows"].append(row)
                continue
            ts = time.time()
            try:
                nll = eval_nll(model, plan, nll_tokens, key)
                pk = eval_task(model, plan, exs["passkey"], cfg.batch, cfg.task_decode)
                nh = eval_task(model, plan, exs["multikey_niah"], cfg.batch, cfg.task_decode)
                row.update(nll=nll["nll"], nll_by_t={k: v for k, v in nll.items() if k.startswith("t=")},
                           density=float(np.mean([nll["density"], pk["density"], nh["density"]])),
                           passkey=pk["acc"], multikey_niah=nh["acc"], passkey_by_answer_tokens=pk["by_answer_tokens"],
                           multikey_niah_by_answer_tokens=nh["by_answer_tokens"], seconds=time.time() - ts)
            except Exception as e:  # noqa: BLE001  (a broken selector is reported, the sweep goes on)
                row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
                traceback.print_exc()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            flush()
    result["seconds"] = time.time() - t0
    flush()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
