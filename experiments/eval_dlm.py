"""Evaluate a trained DLM under dense attention and block-sparse selectors.

    PYTHONPATH=. python3 experiments/eval_dlm.py --ckpt-dir .ckpt/dlm_small --lengths 4096 2048 8192
    # or one process per length (compilation is host-bound: they overlap), then
    PYTHONPATH=. python3 experiments/eval_dlm.py --merge a.json b.json c.json --name dlm_eval

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
(stride 8, same top-k budget), each at 50/70/90% sparsity, block size 128. A
selector that is missing or fails is reported as such, not silently dropped.
Writes ``dlm_eval.json`` and ``dlm_eval.md`` (device, jax version, commit, date).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from baatt.config import BAConfig  # noqa: E402
from baatt.data import corpus, tasks  # noqa: E402
from baatt.data.tokenizer import get_tokenizer  # noqa: E402
from baatt.diffusion import generate  # noqa: E402
from baatt.diffusion.masking import forward_process, masked_ce  # noqa: E402
from baatt.nn import AttentionPlan  # noqa: E402
from baatt.train import accuracy_split, load_model, run_info  # noqa: E402


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
    return out


_CE = jax.jit(lambda logits, toks, masked: (jnp.sum(masked_ce(logits, toks, masked)), jnp.sum(masked)))


def eval_nll(model, plan, tokens, key):
    from baatt.diffusion.sampler import _forward
    from flax import nnx

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
    lines = [f"# DLM evaluation ({result['device']}, jax {result['jax_version']}, commit {result['commit'][:10]}, {result['date']})", ""]
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
    """One result from several eval_dlm.py results of the same checkpoint (rows and notes concatenated)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for p, r in zip(paths, parts):
        if (r["model"], r["step"], r["block_size"]) != (first["model"], first["step"], first["block_size"]):
            raise ValueError(f"--merge needs results of one checkpoint and block size; {p} differs from {paths[0]}")
    result = dict(first, rows=[row for r in parts for row in r["rows"]], notes=[n for r in parts for n in r["notes"]],
                  seconds=max(r.get("seconds", 0.0) for r in parts), merged_from=[str(p) for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="instead of evaluating: merge the rows of these result files (e.g. one process per length) "
                        "into <out>/<name>.json/.md")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 2048, 8192])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--num-examples", type=int, default=16)
    p.add_argument("--nll-seqs", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--task-decode", default="sampler", choices=("sampler", "oneshot"),
                   help="answer decoding for task accuracy: LLaDA sampler (one token per step) or one forward pass")
    p.add_argument("--implementation", default="reference")
    p.add_argument("--only", nargs="*", default=None, help="variant name prefixes to run")
    p.add_argument("--time-budget", type=float, default=None, help="skip remaining work after this many seconds")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--name", default="dlm_eval")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.name)
    if not args.ckpt_dir:
        p.error("--ckpt-dir is required (unless --merge is given)")
    t0 = time.time()
    model, meta = load_model(args.ckpt_dir)
    tok = get_tokenizer()
    val = corpus.load_tokens("val")
    vs = variants(args.sparsities, args.block_size, None if args.implementation == "auto" else args.implementation)
    if args.only:
        vs = {k: v for k, v in vs.items() if any(k.startswith(o) for o in args.only)}
    result = dict(run_info(), model=meta["model"], step=meta["step"], block_size=args.block_size,
                  implementation=args.implementation, num_examples=args.num_examples, task_decode=args.task_decode,
                  rows=[], notes=[])
    if importlib.util.find_spec("baatt.selection.xattention") is None:
        result["notes"].append("xattention selector not present (baatt/selection/xattention.py missing): not run")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def flush():
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (out_dir / f"{args.name}.md").write_text(markdown(result))

    for length in args.lengths:
        rng = np.random.default_rng(length)
        nll_tokens = corpus.packed_batch(val, rng, args.nll_seqs, length)
        exs = {k: [tasks.make_example(k, rng, val, tok, length) for _ in range(args.num_examples)]
               for k in ("passkey", "multikey_niah")}
        key = jax.random.PRNGKey(length)
        for name, plan in vs.items():
            if args.time_budget and time.time() - t0 > args.time_budget:
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
                pk = eval_task(model, plan, exs["passkey"], args.batch, args.task_decode)
                nh = eval_task(model, plan, exs["multikey_niah"], args.batch, args.task_decode)
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
