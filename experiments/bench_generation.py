"""python -m experiments.bench_generation --preset gpu                       (one GPU; 4K / 16K / 32K prompts)
python -m experiments.bench_generation --preset gpu --ckpt-dir .ckpt/dlm    (the same with a trained model's quality)
python -m experiments.bench_generation --preset cpu_smoke --out /tmp/smoke  (CPU, a minute: the code path only)

End-to-end generation with the masked-diffusion sampler (``baatt.diffusion.generate``, block
decoding): the wall time to generate ``gen_tokens`` tokens after a prompt of each length, with
dense attention at every step (cuDNN on a GPU) against BA-Att under each recipe of the sampler:

- ``every_step``: a selection estimated at every step;
- ``reuse``: the first ``dense_warmup`` share of the steps dense (20%), then one selection reused to the end;
- ``refresh``: as ``reuse``, re-estimated every ``refresh_every`` sparse steps;
- ``drift``: as ``reuse``, re-estimated when a key block has had half of its tokens changed;
- ``split``: as ``reuse``, with separate budgets for the prompt's keys (``sparsity``) and the
  generation's keys (``gen_sparsity``);
- ``reuse_tail``: as ``reuse``, with the pooled tail of the dropped blocks (``tail="pooled"``);
- ``block``: a selection per decoding block, estimated at the block's first sparse step from the
  queries of that block (``generate(estimate_from="block")``) and reused for its other steps, after a
  dense warm-up of ``block_warmup`` (none by default); the selector is ``--selector`` when it takes
  query positions, else ``last_query``;
- ``block_refresh``: as ``block``, re-estimated from the block's queries every ``refresh_every`` sparse
  steps inside the block as well (the estimate then sees the answer tokens already written); under
  both, ``block_context`` adds the positions just before the block to the estimate's queries.

Timing: one generation compiles every program (not timed), then ``repeats`` generations are
timed end to end (host loop, every step, the final copy of the tokens) and their median is
reported as tokens/s and as a speedup over the dense row of the same prompt length (run first). The
prompt is held-out text and the generated span's reference is the text's continuation: the
NLL column is the mean negative log-probability of that continuation at each generated
position under the step that committed it (``SampleResult.reference_nll``), from the timed
runs themselves.

Weights: with ``--ckpt-dir`` a checkpoint of ``baatt.train`` (speed and quality); without it the
preset's model (``baatt.nn.config.PRESETS``; ``--model smollm2_shape`` is the adapted SmolLM2's
shape) at random init, which times exactly the same computation but whose NLL means nothing: the
table then leaves quality out. With ``--gguf`` the model is a pretrained causal LM adapted to masked
diffusion (``baatt.adapt``; ``--gguf smollm2`` is SmolLM2-135M-Instruct), its prompts tokenised with
the GGUF's own tokenizer, and ``--ckpt-dir`` holds the weights ``experiments.adapt_smollm2`` trained
from it (``.ckpt/smollm2_dlm``). With a checkpoint, passkey accuracy comes from ``passkey_examples``
more generations with each row's settings (a key hidden in held-out text, the question ending the
prompt; exact match of the first generated tokens), not timed, for canvases up to
``passkey_max_length`` tokens (default: the length the checkpoint was trained at), and the share of
the answer positions committed at a sparse step (the answer comes first in the generation, so a long
dense warm-up writes it before any selection is made: then the row says nothing of the selection).

Writes ``<name>.json`` and ``<name>.md`` under ``--out`` (default
``experiments/results/bench_generation/``) after every row.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
from flax import nnx

from baatt import adapt
from baatt.config import BAConfig
from baatt.data import corpus, tasks
from baatt.data.tokenizer import get_tokenizer
from baatt.diffusion import generate
from baatt.nn import AttentionPlan, DiffusionLM
from baatt.nn import get_config as model_config
from baatt.selection import get_selector
from baatt.train import load_model
from experiments import harness

RECIPE_NAMES = ("dense", "every_step", "reuse", "refresh", "drift", "split", "reuse_tail", "block", "block_refresh")


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "gpu"
    model: str = harness.option("small", "model preset at random init (baatt.nn.config.PRESETS) when no --ckpt-dir")
    ckpt_dir: str | None = harness.option(None, "checkpoint of baatt.train: its weights, and the quality columns")
    gguf: str | None = harness.option(
        None, "a pretrained causal LM's GGUF adapted to masked diffusion instead of --model ('smollm2': "
              "SmolLM2-135M-Instruct, joined from .data/carry/ parts when missing); --ckpt-dir then holds "
              "experiments.adapt_smollm2's weights")
    dtype: str = harness.option("bfloat16", "compute dtype of the random-init model",
                                choices=("bfloat16", "float32"))
    prompt_lengths: tuple[int, ...] = harness.option((4096, 16384, 32768), "prompt lengths (tokens)")
    gen_tokens: int = harness.option(256, "tokens generated after the prompt")
    block_length: int = harness.option(32, "tokens per decoding block (semi-autoregressive)")
    steps: int = harness.option(128, "denoising steps in all (a multiple of gen_tokens / block_length)")
    batch: int = harness.option(1, "sequences generated at once")
    block_size: int = harness.option(128, "query and key block size of BA-Att")
    max_documents: int | None = harness.option(
        None, "with --gguf: held-out text from only the first that many documents of each corpus split "
              "(tokenised at start-up, not cached; default: all)")
    selector: str = harness.option(BAConfig().selector, "BA-Att block selector (baatt.selector_registry)")
    sparsity: float = harness.option(0.9, "BA-Att sparsity (the prompt's, under the split recipe)")
    gen_sparsity: float = harness.option(0.5, "sparsity of the generation's keys under the split recipe")
    refresh_every: int = harness.option(16, "sparse steps between estimates under the refresh and block_refresh recipes")
    dense_warmup: float = harness.option(0.2, "share of the steps run dense before the first selection "
                                              "(the recipes that reuse a selection)")
    block_warmup: float = harness.option(0.0, "share of the steps run dense before the first selection "
                                              "(the block recipe)")
    block_context: int = harness.option(0, "positions before the decoding block added to its estimate's queries "
                                           "under the block recipes (generate(block_context=...))")
    recipes: tuple[str, ...] = harness.option(RECIPE_NAMES, "rows, in this order", choices=RECIPE_NAMES)
    implementation: str = harness.option("auto", "baatt.attention implementation (auto: the best available)")
    repeats: int = harness.option(3, "timed generations per row (after one that compiles)")
    passkey_examples: int = harness.option(8, "passkey generations per row (with --ckpt-dir)")
    passkey_max_length: int | None = harness.option(
        None, "passkey accuracy only where prompt + generation fit this many tokens (default: the checkpoint's "
              "training length)")
    seed: int = harness.option(0, "seed of the prompts and the random init")
    out: str = harness.option(harness.study_dir("bench_generation"), "output folder")
    name: str = harness.option("bench_generation", "output file stem")


PRESETS = {
    "gpu": Config(),
    # CPU smoke run and tests: the tiny model, one short prompt, every recipe, one timed run.
    "cpu_smoke": Config(preset="cpu_smoke", model="tiny", dtype="float32", prompt_lengths=(256,), gen_tokens=32,
                        block_length=16, steps=4, block_size=32, sparsity=0.5, refresh_every=2,
                        implementation="reference", repeats=1, passkey_examples=2, name="bench_generation_cpu_smoke"),
}


def get_config(preset: str = "gpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def recipes(cfg: Config) -> dict[str, tuple[AttentionPlan, dict]]:
    """name -> (attention plan, generate() keyword arguments) of each recipe."""
    implementation = None if cfg.implementation == "auto" else cfg.implementation
    ba = BAConfig(selector=cfg.selector, block_size=cfg.block_size, sparsity=cfg.sparsity)
    plan = AttentionPlan.ba(ba, implementation=implementation)
    reuse = dict(dense_warmup=cfg.dense_warmup, reuse_every=None)
    block_selector = cfg.selector if get_selector(cfg.selector).query_positions else "last_query"
    block_plan = AttentionPlan.ba(ba.replace(selector=block_selector), implementation=implementation)
    block = dict(dense_warmup=cfg.block_warmup, reuse_every=None, estimate_from="block",
                 block_context=cfg.block_context)
    return {
        "dense": (AttentionPlan.dense(), {}),
        "every_step": (plan, dict(reuse_every=1)),
        "reuse": (plan, reuse),
        "refresh": (plan, dict(reuse, reuse_every=cfg.refresh_every)),
        "drift": (plan, dict(reuse, refresh_drift=0.5)),
        "split": (plan, dict(reuse, prompt_sparsity=cfg.sparsity, gen_sparsity=cfg.gen_sparsity)),
        "reuse_tail": (AttentionPlan.ba(ba.replace(tail="pooled"), implementation=implementation), reuse),
        "block": (block_plan, block),
        "block_refresh": (block_plan, dict(block, reuse_every=cfg.refresh_every)),
    }


def load(cfg: Config, max_length: int) -> tuple[DiffusionLM, dict, np.ndarray, object]:
    """(model, what it is, held-out token stream, its tokenizer): the checkpoint (its max_len raised to the
    longest canvas: rotary positions are computed, nothing learnt depends on it), the GGUF adapted to
    diffusion (with the checkpoint's weights), or the preset at random init."""
    if cfg.gguf is not None:
        return load_adapted(cfg, max_length)
    stream, tokenizer = corpus.load_tokens("val"), get_tokenizer()
    if cfg.ckpt_dir:
        model, meta = load_model(cfg.ckpt_dir)
        trained_len = model.cfg.max_len
        if max_length > trained_len:
            model.cfg = model.cfg.replace(max_len=max_length)
        return model, dict(weights=f"checkpoint {cfg.ckpt_dir} (step {meta['step']}, model {meta['model']})",
                           max_len=trained_len), stream, tokenizer
    mcfg = model_config(cfg.model, max_len=max_length, dtype=cfg.dtype)
    # scanned: one compiled block per run of identical layers (a 30-layer preset compiles in seconds)
    return (adapt.ScannedDiffusionLM(mcfg, rngs=nnx.Rngs(cfg.seed)), dict(weights=f"{cfg.model} at random init"),
            stream, tokenizer)


def load_adapted(cfg: Config, max_length: int):
    """``load`` for ``--gguf``: the GGUF's causal LM adapted to masked diffusion, the checkpoint's weights
    restored into it, and held-out text in the GGUF's tokens."""
    from pathlib import Path

    from experiments.adapt_smollm2 import load_adapted as load_checkpoint
    from experiments.adapt_smollm2 import smollm2_gguf

    smollm2 = cfg.gguf == "smollm2"
    path = smollm2_gguf() if smollm2 else Path(cfg.gguf)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf: no file at {path}")
    model, tokenizer, weights, trained_len = load_checkpoint(path, cfg.ckpt_dir, cfg.dtype)
    if max_length > model.cfg.max_len:
        model.cfg = model.cfg.replace(max_len=max_length)
    own_cache = smollm2 and cfg.max_documents is None  # SmolLM2's streams are cached in the data dir
    streams = adapt.token_streams(tokenizer, cache_dir=adapt.smollm2_token_dir() if own_cache else None,
                                  max_documents=cfg.max_documents)
    return model, dict(weights=weights, max_len=trained_len), streams.val, tokenizer


def text_canvas(stream: np.ndarray, rng, cfg: Config, prompt_length: int, mask_id: int):
    """(canvas with ``gen_tokens`` mask tokens after a held-out prompt, the text's true continuation) [B, L]."""
    text = corpus.packed_batch(stream, rng, cfg.batch, prompt_length + cfg.gen_tokens)
    canvas = text.copy()
    canvas[:, prompt_length:] = mask_id
    return canvas, text


def passkey_canvases(stream, tokenizer, rng, cfg: Config, prompt_length: int, mask_id: int):
    """(canvas [1, L], answer tokens) per example: the prompt is exactly ``prompt_length`` tokens ending with
    the question (haystack tokens dropped at its start), then ``gen_tokens`` mask tokens."""
    out = []
    while len(out) < cfg.passkey_examples:
        ex = tasks.passkey(rng, stream, tokenizer, prompt_length + 16, depth=float(rng.uniform(0.1, 0.9)))
        cut = ex.answer_start - prompt_length
        if ex.needle_spans[0][0] < cut:
            continue
        canvas = np.full((1, prompt_length + cfg.gen_tokens), mask_id, np.int32)
        canvas[0, :prompt_length] = ex.tokens[cut: ex.answer_start]
        out.append((canvas, ex.answer_tokens))
    return out


def time_generation(model, canvas, reference, plan, options, cfg: Config):
    """(median seconds of ``repeats`` timed generations after one that compiles, the last result)."""
    run = lambda: generate(model, canvas, steps=cfg.steps, block_length=cfg.block_length, plan=plan,
                           reference=reference, **options)
    result = run()
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        result = run()  # ends with the tokens on the host: every step has run
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def passkey_accuracy(model, canvases, plan, options, cfg: Config, tokenizer=None,
                     samples: int = 4) -> tuple[float, float, list[dict], list[int]]:
    """(share of the examples whose first generated tokens are the answer, share of the answer positions of
    all examples committed at a sparse step: under a recipe with a dense warm-up, what the sparse steps
    decided, the answer beside the start of the generation for the first ``samples`` examples, and 1 / 0
    per example: whether it was found)."""
    hits, sparse, total, shown = [], 0, 0, []
    for canvas, answer in canvases:
        r = generate(model, canvas, steps=cfg.steps, block_length=cfg.block_length, plan=plan, **options)
        start = canvas.shape[1] - cfg.gen_tokens
        hits.append(int(np.array_equal(r.tokens[0, start: start + len(answer)], answer)))
        steps = r.unmask_step[0, start: start + len(answer)]
        sparse += sum(r.step_kind[int(t)] != "dense" for t in steps)
        total += len(answer)
        if tokenizer is not None and len(shown) < samples:
            shown.append(dict(answer=tokenizer.decode([int(t) for t in answer]),
                              generated=tokenizer.decode([int(t) for t in r.tokens[0, start: start + 16]])))
    return sum(hits) / len(canvases), sparse / total, shown, hits


def paired_with_dense(hits: list[int], dense_hits: list[int]) -> dict:
    """Per-prompt comparison of a recipe with dense generation on the same prompts: ``lost`` (dense found the
    key, the recipe did not), ``gained`` (the reverse), and the difference in points (100 x (gained - lost)
    / prompts). Two dense runs of the same prompts already differ by a prompt or two (bf16 on a GPU), so
    lost and gained say whether a difference is a shift or noise."""
    if len(hits) != len(dense_hits):
        raise ValueError(f"hits: one per dense prompt ({len(dense_hits)}); got {len(hits)}")
    lost = sum(d and not h for h, d in zip(hits, dense_hits))
    gained = sum(h and not d for h, d in zip(hits, dense_hits))
    return dict(lost=lost, gained=gained, points=100.0 * (gained - lost) / max(len(hits), 1))


def markdown(result: dict) -> str:
    quality = result["quality"]
    lines = [f"# Generation speed ({harness.describe_run(result)})", "",
             f"Weights: {result['weights']}. {result['gen_tokens']} tokens generated after the prompt, block "
             f"decoding ({result['block_length']} tokens per block, {result['steps']} steps), batch "
             f"{result['batch']}; BA-Att selector {result['selector']}, block {result['block_size']}, sparsity "
             f"{result['sparsity']}, implementation {result['implementation']}. Time: median of "
             f"{result['repeats']} generations end to end.", ""]
    head = "| prompt | recipe | time (s) | tokens/s | speedup vs dense | mean density | dense / estimate / reuse steps |"
    rule = "|---|---|---|---|---|---|---|"
    if quality:
        head += " NLL | passkey acc | answer from sparse steps | passkey vs dense: lost / gained (points) |"
        rule += "---|---|---|---|"
    lines += [head, rule]
    for row in result["rows"]:
        kinds = row["step_kinds"]
        recipe = row["recipe"]
        if row.get("selector") not in (None, result["selector"]):  # the block recipe's own selector
            recipe += f" ({row['selector']})"
        line = (f"| {harness.format_length(row['prompt_length'])} | {recipe} | {row['seconds']:.3f} | "
                f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | {row['mean_density']:.3f} | "
                f"{kinds['dense']} / {kinds['estimate']} / {kinds['reuse']} |")
        if quality:
            passkey = f"{row['passkey']:.2f}" if "passkey" in row else "-"
            share = f"{row['passkey_sparse_share']:.2f}" if "passkey" in row else "-"
            paired = row.get("passkey_vs_dense")
            versus = f"{paired['lost']} / {paired['gained']} ({paired['points']:+.1f})" if paired else "-"
            line += f" {row['nll']:.3f} | {passkey} | {share} | {versus} |"
        lines.append(line)
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    model, about, stream, tokenizer = load(cfg, max(cfg.prompt_lengths) + cfg.gen_tokens)
    quality = cfg.ckpt_dir is not None
    result = dict(harness.run_metadata(__spec__.name, argv), **dataclasses.asdict(cfg), **about, quality=quality,
                  rows=[], notes=[])
    if not quality:
        result["notes"].append("random-init weights: the rows time the computation of a trained model of this "
                               "shape; NLL and passkey accuracy are left out")
    elif "max_len" in about and max(cfg.prompt_lengths) + cfg.gen_tokens > about["max_len"]:
        result["notes"].append(f"canvases longer than the checkpoint's max_len ({about['max_len']}) run past the "
                               "lengths it was trained on")
    mask_id = model.cfg.mask_id
    passkey_max = cfg.passkey_max_length or about.get("max_len")
    plans = recipes(cfg)
    for prompt_length in cfg.prompt_lengths:
        rng = np.random.default_rng(cfg.seed + prompt_length)
        canvas, text = text_canvas(stream, rng, cfg, prompt_length, mask_id)
        with_passkey = quality and (passkey_max is None or prompt_length + cfg.gen_tokens <= passkey_max)
        passkeys = passkey_canvases(stream, tokenizer, rng, cfg, prompt_length, mask_id) if with_passkey else []
        dense_seconds = dense_hits = None
        for name in sorted(cfg.recipes, key=lambda n: n != "dense"):  # dense first: the speedups' baseline
            plan, options = plans[name]
            seconds, r = time_generation(model, canvas, text, plan, options, cfg)
            dense_seconds = seconds if name == "dense" else dense_seconds
            row = dict(prompt_length=prompt_length, recipe=name, options=dict(options),
                       selector=plan.config.selector if plan.config is not None else None,
                       seconds=seconds, tokens_per_s=cfg.batch * cfg.gen_tokens / seconds,
                       speedup=(dense_seconds / seconds) if dense_seconds else float("nan"),
                       mean_density=r.mean_density, step_kinds={k: r.step_kind.count(k)
                                                                for k in ("dense", "estimate", "reuse")},
                       nll=r.reference_nll)
            if passkeys:
                row["passkey"], row["passkey_sparse_share"], row["passkey_samples"], row["passkey_hits"] = (
                    passkey_accuracy(model, passkeys, plan, options, cfg, tokenizer))
                if name == "dense":
                    dense_hits = row["passkey_hits"]
                elif dense_hits is not None:
                    row["passkey_vs_dense"] = paired_with_dense(row["passkey_hits"], dense_hits)
            result["rows"].append(row)
            print({k: v for k, v in row.items() if k not in ("options", "passkey_samples", "passkey_hits")},
                  flush=True)
            for sample in row.get("passkey_samples", []):
                print(f"  answer {sample['answer']!r}: generated {sample['generated']!r}", flush=True)
            harness.write_results(cfg.out, {f"{cfg.name}.json": result, f"{cfg.name}.md": markdown(result)})
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
