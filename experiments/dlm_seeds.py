"""python -m experiments.dlm_seeds --run-dirs RUN_DIR [RUN_DIR ...] --name dlm_seeds

One table for a multi-seed DLM run: how many seeds learn retrieval, and what the selectors keep.
Each RUN_DIR holds what ``scripts/dlm_experiment.sh`` writes for one training
(``dlm_train_<preset>.json`` and ``dlm_eval_<preset>.json``); ``scripts/dlm_seeds.sh``
makes one per seed. Per seed: training steps, the first step at which the
in-training passkey check reached ``--learnt`` (default 0.5), its final value,
dense one-shot passkey accuracy and masked NLL per length. For the seeds whose
dense 4K accuracy reaches ``--learnt`` (the ones that retrieve), every sparse
variant's passkey accuracy. Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (the
in-training check per seed against step, and the dense evaluation per length) under ``--out``
(default ``experiments/results/dlm/``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments import harness


@dataclasses.dataclass(frozen=True)
class Config:
    run_dirs: tuple[str, ...] = harness.option((), "one folder per seed, as scripts/dlm_experiment.sh writes it")
    learnt: float = harness.option(0.5, "accuracy that counts as retrieval learnt")
    retrieval_length: int = harness.option(4096, "length at which dense accuracy decides retrieval")
    out: str = harness.option(harness.study_dir("dlm"), "output folder")
    name: str = harness.option("dlm_seeds", "output file stem")


def get_config(**overrides) -> Config:
    return dataclasses.replace(Config(), **overrides)


def _one(path: Path, pattern: str) -> dict:
    found = sorted(path.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one {pattern}, found {len(found)}")
    return json.loads(found[0].read_text())


def seed_row(run_dir: Path, learnt: float) -> dict:
    train, ev = _one(run_dir, "dlm_train_*.json"), _one(run_dir, "dlm_eval_*.json")
    checks = [h for h in train["history"] if "passkey_acc" in h]
    first = next((h["step"] for h in checks if h["passkey_acc"] >= learnt), None)
    by = {(r["length"], r["variant"]): r for r in ev["rows"]}
    lengths = sorted({length for length, _ in by})
    return dict(
        run_dir=str(run_dir), seed=train["config"]["seed"], preset=train.get("preset"), device=train["device"],
        jax_version=train["jax_version"], commit=train["commit"], steps=train["steps"], first_learnt_step=first,
        final_check=checks[-1]["passkey_acc"] if checks else None,
        checks=[(h["step"], h["passkey_acc"]) for h in checks],
        dense={length: dict(passkey=by[(length, "dense")]["passkey"], nll=by[(length, "dense")]["nll"])
               for length in lengths if (length, "dense") in by},
        sparse={f"{length}:{variant}": r["passkey"] for (length, variant), r in by.items() if variant != "dense"},
    )


def summarize(run_dirs, learnt: float = 0.5, retrieval_length: int = 4096) -> dict:
    rows = sorted((seed_row(Path(d), learnt) for d in run_dirs), key=lambda r: r["seed"])
    retrieving = [r for r in rows if r["dense"].get(retrieval_length, {}).get("passkey", 0.0) >= learnt]
    return dict(device=rows[0]["device"], jax_version=rows[0]["jax_version"], learnt=learnt,
                retrieval_length=retrieval_length, seeds=rows,
                retrieving=[r["seed"] for r in retrieving], share_retrieving=len(retrieving) / len(rows))


def _distinct(values) -> str:
    """The values, each once, in first-seen order, comma-separated."""
    return ", ".join(dict.fromkeys(values))


def _acc(x):
    return "-" if x is None else f"{x:.3f}"


def markdown(s: dict) -> str:
    rows = s["seeds"]
    lengths = sorted({length for r in rows for length in r["dense"]}, key=int)
    first = rows[0]
    # Seeds gathered from several runs (one per call) may differ in device, jax or commit: name each.
    devices, jaxes = _distinct(r["device"] for r in rows), _distinct(r["jax_version"] for r in rows)
    commits = _distinct(r["commit"][:10] for r in rows)
    lines = [f"# {first['preset']}: {len(rows)} seeds ({devices}, jax {jaxes}, "
             f"commit{'s' if ',' in commits else ''} {commits})", "",
             f"{len(s['retrieving'])} of {len(rows)} seeds retrieve (dense one-shot passkey >= {s['learnt']} at "
             f"{s['retrieval_length']} tokens): {s['retrieving']}.", "",
             "| seed | steps | in-training check >= {:.1f} at step | final check | ".format(s["learnt"])
             + " | ".join(f"dense {length}" for length in lengths) + " | "
             + " | ".join(f"NLL {length}" for length in lengths) + " |",
             "|" + "---|" * (4 + 2 * len(lengths))]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['steps']:,} | {r['first_learnt_step'] or 'never'} | {_acc(r['final_check'])} | "
                     + " | ".join(_acc(r["dense"].get(length, {}).get("passkey")) for length in lengths) + " | "
                     + " | ".join(_acc(r["dense"].get(length, {}).get("nll")) for length in lengths) + " |")
    keep = [r for r in rows if r["seed"] in s["retrieving"]]
    if keep:
        variants = sorted({key.split(":", 1)[1] for r in keep for key in r["sparse"]})
        lines += ["", "Passkey accuracy of every variant on the seeds that retrieve:", "",
                  "| seed | L | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
        for r in keep:
            for length in lengths:
                lines.append(f"| {r['seed']} | {length} | "
                             + " | ".join(_acc(r["sparse"].get(f"{length}:{v}")) for v in variants) + " |")
    return "\n".join(lines) + "\n"


def plot(s: dict):
    """In-training passkey check per seed against step (retrieving seeds solid), and the dense
    evaluation per length: the picture of which seeds learn retrieval and when."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2))
    for r in s["seeds"]:
        steps, acc = zip(*r["checks"]) if r["checks"] else ((), ())
        solid = r["seed"] in s["retrieving"]
        ax.plot(steps, acc, "-" if solid else "--", marker="o", ms=3, label=f"seed {r['seed']}")
    ax.axhline(s["learnt"], color="gray", lw=0.8)
    ax.set(xlabel="training step", ylabel="in-training one-shot passkey check", ylim=(-0.03, 1.03),
           title="when each seed learns retrieval")
    ax.legend(fontsize=8, ncol=2)
    lengths = sorted({length for r in s["seeds"] for length in r["dense"]}, key=int)
    width = 0.8 / max(1, len(s["seeds"]))
    for i, r in enumerate(s["seeds"]):
        bx.bar([j + i * width for j in range(len(lengths))],
               [r["dense"].get(length, {}).get("passkey", 0.0) for length in lengths], width, label=f"seed {r['seed']}")
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [str(length) for length in lengths])
    bx.set(xlabel="tokens", ylabel="dense one-shot passkey accuracy", ylim=(0, 1.03), title="evaluation, dense attention")
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__)
    if not cfg.run_dirs:
        raise SystemExit("dlm_seeds: --run-dirs needs at least one run folder")
    s = summarize(cfg.run_dirs, cfg.learnt, cfg.retrieval_length)
    md = markdown(s)
    harness.write_results(cfg.out, {f"{cfg.name}.json": s, f"{cfg.name}.md": md + f"\n![seeds]({cfg.name}.png)\n",
                                    f"{cfg.name}.png": plot(s)})
    print(md)
    return s


if __name__ == "__main__":
    main()
