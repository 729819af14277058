"""python -m experiments.tail_compensation                     (CPU, SmolLM2 at 2K tokens, 10-30 minutes)
python -m experiments.tail_compensation --preset gpu         (one GPU: 8K tokens; --ppl-fitted adds the
                                                             perplexity of the fitted temperatures)

Tail compensation (``BAConfig(tail="pooled")``, ``baatt.reference.tail``) on real attention:
SmolLM2-135M-Instruct (the GGUF that ``bash scripts/setup_data.sh`` installs) reading a State of
the Union address. A selection keeps the top key blocks of each query block by mean pooling
(block 64, the sink block forced); the tail adds a pooled estimate of every dropped block.

Measures, at each sparsity, without a tail and with each variant:

1. Output error on the model's real Q/K/V (``baatt.nn.capture_qkv`` of the causal model, dense):
   ``||out - dense|| / ||dense||`` per layer, under a bidirectional mask (as the earlier probe of
   docs/spec.md section 10.1) and under the causal mask the model was trained with.
2. Perplexity of SmolLM2 itself with every layer block-sparse under its causal mask (next-token
   NLL over the first ``ppl_length`` tokens of the document).

Variants: ``pooled`` (one pooled key per dropped block), ``pooled/G`` (G-token sub-blocks for
every dropped block), ``pooled/G top-R`` (sub-blocks for the R highest-scoring dropped blocks of
each query block, one key for the others) and ``pooled T`` (one key per block, a temperature per
head fitted on another document: the grid value with the least output error of that head, per
layer, mask and sparsity).

Writes ``results.json`` (every number, per layer, with the run's metadata), ``table.md`` and
``tail.png`` to ``--out`` (default ``experiments/results/tail_compensation/``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import baatt
from baatt import AttentionMask, reference
from baatt.attention_mask import BIDIRECTIONAL, CAUSAL
from baatt.data import data_dir
from baatt.nn import AttentionPlan, capture_qkv, load_smollm2
from baatt.reference.tail import tail_compensated_attention
from experiments import harness

MASKS = {"bidirectional": BIDIRECTIONAL, "causal": CAUSAL}


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "cpu"
    text: str = harness.option("2010_barack_obama_d.txt", "evaluated document (a file of .data/raw/sotu)")
    calibration_text: str = harness.option(
        "2009_barack_obama_d.txt", "document the per-head temperatures are fitted on (a file of .data/raw/sotu)")
    length: int = harness.option(2048, "tokens of each document whose Q/K/V are measured")
    layers: tuple[int, ...] = harness.option((0, 1, 7, 15, 23, 29), "layers whose output error is measured")
    ppl_length: int = harness.option(2048, "tokens of the perplexity run (0: no perplexity run)")
    ppl_fitted: bool = harness.option(
        True, "also run the perplexity with the fitted per-head temperatures (a compiled block per layer)")
    block_size: int = harness.option(64, "query and key block size")
    sparsities: tuple[float, ...] = harness.option((0.7, 0.9, 0.95), "fixed-budget sparsities")
    group: int = harness.option(16, "tokens per pooled key of the sub-block variants")
    refine: int = harness.option(2, "dropped blocks per query block pooled in sub-blocks by the top-R variant")
    temperatures: tuple[float, ...] = harness.option(
        (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5), "grid of the fitted per-head temperature")
    implementation: str = harness.option("reference", "baatt.attention implementation of the perplexity run "
                                                      "(auto: the best available)")
    out: str = harness.option(harness.study_dir("tail_compensation"), "output folder")


PRESETS = {
    "cpu": Config(),
    # The earlier probe's size (8K tokens) and perplexity over the same 8K tokens, on a GPU.
    # The per-layer temperatures compile each of the 30 blocks again per sparsity: --ppl-fitted adds them.
    "gpu": Config(preset="gpu", length=8192, ppl_length=8192, ppl_fitted=False, implementation="auto"),
}


def get_config(preset: str = "cpu", **overrides) -> Config:
    """The preset's configuration with ``overrides`` (Config fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}; got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A tail option: the BAConfig fields it sets, and whether its temperature is fitted per head."""

    name: str
    fields: tuple[tuple[str, object], ...] = ()
    fitted: bool = False

    def config(self, base: baatt.BAConfig, temperature=None) -> baatt.BAConfig:
        fields = dict(self.fields)
        if temperature is not None:
            fields["tail_temperature"] = tuple(float(t) for t in temperature)
        return base.replace(**fields)


def variants(cfg: Config) -> list[Variant]:
    g, r = cfg.group, cfg.refine
    return [
        Variant("none"),
        Variant("pooled", (("tail", "pooled"),)),
        Variant(f"pooled/{g}", (("tail", "pooled"), ("tail_group", g))),
        Variant(f"pooled/{g} top-{r}", (("tail", "pooled"), ("tail_group", g), ("tail_refine", r))),
        Variant("pooled T", (("tail", "pooled"),), fitted=True),
    ]


def selection_config(cfg: Config, sparsity: float, mask: AttentionMask) -> baatt.BAConfig:
    return baatt.BAConfig(block_size=cfg.block_size, sparsity=sparsity, selector="meanpool", force_sink=True,
                          mask=mask)


@functools.partial(jax.jit, static_argnames=("group", "refine", "tail"))
def _sparse_output(q, k, v, selection, temperature, *, tail, group, refine):
    if not tail:
        return reference.block_sparse_attention(q, k, v, selection)[0]
    return tail_compensated_attention(q, k, v, selection, group=group, refine=refine, temperature=temperature)[0]


def sparse_output(q, k, v, selection, variant_config: baatt.BAConfig, temperature=None):
    """Block-sparse attention over ``selection`` with the variant's tail (a traced per-head ``temperature`` if given)."""
    t = variant_config.tail_temperature if temperature is None else temperature
    return _sparse_output(q, k, v, selection, jnp.asarray(t, jnp.float32), tail=variant_config.tail == "pooled",
                          group=variant_config.tail_group, refine=variant_config.tail_refine)


def document_tokens(name: str, tokenizer, length: int) -> np.ndarray:
    path = data_dir() / "raw" / "sotu" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `bash scripts/setup_data.sh`")
    ids = tokenizer.encode(path.read_text())
    if len(ids) < length:
        raise ValueError(f"{name} has {len(ids)} tokens; --length and --ppl-length must be at most that")
    return np.asarray([ids[:length]], np.int32)


def fit_temperatures(qkv: dict, cfg: Config, mask: AttentionMask, sparsity: float) -> tuple[float, ...]:
    """Per query head, the grid temperature whose one-key-per-block tail gives the least output error."""
    q, k, v = (jnp.asarray(qkv[n]) for n in ("q", "k", "v"))
    dense, _ = reference.dense_attention(q, k, v, mask=mask)
    sel = baatt.select_blocks(q, k, selection_config(cfg, sparsity, mask))
    pooled = baatt.BAConfig(tail="pooled")
    errors = np.stack([np.asarray(reference.error.relative_output_error(
        sparse_output(q, k, v, sel, pooled, jnp.full((q.shape[2],), t)), dense, axis=(0, 1, 3)))
        for t in cfg.temperatures])  # [grid, Hq]
    return tuple(float(cfg.temperatures[i]) for i in np.argmin(errors, axis=0))


def output_errors(model, tokens, cfg: Config, fitted: dict) -> list[dict]:
    """Rows (mask, sparsity, variant, layer, error) of the measured layers."""
    rows = []
    captured = capture_qkv(model, tokens, layers=cfg.layers)
    for layer, qkv in tqdm(captured.items(), desc="output error", unit="layer", file=sys.stdout):
        q, k, v = (jnp.asarray(qkv[n]) for n in ("q", "k", "v"))
        for mask_name, mask in MASKS.items():
            dense, _ = reference.dense_attention(q, k, v, mask=mask)
            for s in cfg.sparsities:
                sel = baatt.select_blocks(q, k, selection_config(cfg, s, mask))
                for variant in variants(cfg):
                    temperature = fitted[(mask_name, layer, s)] if variant.fitted else None
                    out = sparse_output(q, k, v, sel, variant.config(baatt.BAConfig()), temperature)
                    rows.append(dict(mask=mask_name, sparsity=s, variant=variant.name, layer=layer,
                                     error=float(reference.error.relative_output_error(out, dense))))
    return rows


@nnx.jit(static_argnames=("plan", "layer"))
def _run_block(block, x, cos, sin, *, plan, layer):
    return block(x, cos, sin, plan=plan, layer=layer)[0]


@nnx.jit
def _next_token_nll(model, x, tokens):
    logits = model.logits(model.final_norm(x)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(model, tokens, plan: AttentionPlan) -> float:
    """exp of the mean next-token NLL, the model run block by block (one compiled block per distinct layer
    config: layers configured alike share one)."""
    n = model.cfg.num_layers
    x, cos, sin = model.embed_inputs(jnp.asarray(tokens))
    first_alike: dict = {}
    for i, block in enumerate(model.blocks):
        alike = first_alike.setdefault(plan.layer_config(i, n), i)
        x = _run_block(block, x, cos, sin, plan=plan, layer=alike)
    return float(jnp.exp(_next_token_nll(model, x, jnp.asarray(tokens))))


def perplexities(model, tokens, cfg: Config, fitted: dict) -> list[dict]:
    """Rows (sparsity, variant, perplexity), dense first."""
    implementation = None if cfg.implementation == "auto" else cfg.implementation
    rows = [dict(sparsity=0.0, variant="dense", perplexity=perplexity(model, tokens, AttentionPlan.dense()))]
    n = model.cfg.num_layers
    jobs = [(s, v) for s in cfg.sparsities for v in variants(cfg) if cfg.ppl_fitted or not v.fitted]
    for s, variant in tqdm(jobs, desc="perplexity", unit="run", file=sys.stdout):
        base = variant.config(selection_config(cfg, s, CAUSAL))
        layer_configs = tuple(variant.config(base, fitted[("causal", i, s)]) if variant.fitted else base
                              for i in range(n))
        plan = AttentionPlan(kind="ba", layer_configs=layer_configs, implementation=implementation)
        rows.append(dict(sparsity=s, variant=variant.name, perplexity=perplexity(model, tokens, plan)))
    return rows


def run(cfg: Config, argv=None) -> dict:
    t0 = time.time()
    model_cfg, model, tokenizer = load_smollm2(progress=False, dtype="float32")
    tokens = document_tokens(cfg.text, tokenizer, max(cfg.length, cfg.ppl_length))
    calibration = document_tokens(cfg.calibration_text, tokenizer, cfg.length)
    fit_layers = range(model_cfg.num_layers) if cfg.ppl_length and cfg.ppl_fitted else cfg.layers
    fitted = {}
    captured = capture_qkv(model, calibration, layers=fit_layers)
    for layer, qkv in tqdm(captured.items(), desc="fit temperatures", unit="layer", file=sys.stdout):
        for mask_name, mask in MASKS.items():
            if mask_name == "bidirectional" and layer not in cfg.layers:
                continue  # the perplexity run is causal
            for s in cfg.sparsities:
                fitted[(mask_name, layer, s)] = fit_temperatures(qkv, cfg, mask, s)
    del captured
    results = dict(
        errors=output_errors(model, tokens[:, : cfg.length], cfg, fitted),
        perplexity=perplexities(model, tokens[:, : cfg.ppl_length], cfg, fitted) if cfg.ppl_length else [],
        temperatures=[dict(mask=m, layer=layer, sparsity=s, per_head=list(t)) for (m, layer, s), t in fitted.items()],
    )
    results["meta"] = harness.run_metadata(
        __spec__.name, argv, model="SmolLM2-135M-Instruct (GGUF Q4_1, float32 compute)", text=cfg.text,
        calibration_text=cfg.calibration_text, seconds=round(time.time() - t0, 1), config=dataclasses.asdict(cfg))
    return results


def _mean_error(results: dict, mask: str, sparsity: float, variant: str) -> float:
    return float(np.mean([r["error"] for r in results["errors"]
                          if (r["mask"], r["sparsity"], r["variant"]) == (mask, sparsity, variant)]))


def write_table(results: dict, cfg: Config) -> str:
    meta = results["meta"]
    pct = [f"{round(100 * s)}%" for s in cfg.sparsities]
    names = [v.name for v in variants(cfg)]
    lines = [f"SmolLM2-135M-Instruct on {meta['text']} (temperatures fitted on {meta['calibration_text']}); "
             f"mean-pooling selection, block {cfg.block_size}, sink block forced; {harness.describe_run(meta)}.", ""]
    for mask in MASKS:
        lines += [f"### Output error, {mask} mask ({cfg.length} tokens, mean over layers {list(cfg.layers)})", "",
                  "| tail | " + " | ".join(pct) + " |", "|---" * (1 + len(pct)) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{_mean_error(results, mask, s, name):.3f}" for s in cfg.sparsities)
                  + " |" for name in names]
        lines.append("")
    if results["perplexity"]:
        ppl = {(r["sparsity"], r["variant"]): r["perplexity"] for r in results["perplexity"]}
        lines += [f"### Perplexity, every layer block-sparse under the causal mask ({cfg.ppl_length} tokens; "
                  f"dense {ppl[(0.0, 'dense')]:.2f})", "", "| tail | " + " | ".join(pct) + " |",
                  "|---" * (1 + len(pct)) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{ppl[(s, name)]:.2f}" for s in cfg.sparsities) + " |"
                  for name in names if (cfg.sparsities[0], name) in ppl]
    return "\n".join(lines) + "\n"


def plot(results: dict, cfg: Config) -> dict:
    """{file name: figure}: output error per mask and perplexity against sparsity, one line per tail variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(MASKS) + bool(results["perplexity"])
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    xs = [100 * s for s in cfg.sparsities]
    for ax, mask in zip(axes, MASKS):
        for v in variants(cfg):
            ax.plot(xs, [_mean_error(results, mask, s, v.name) for s in cfg.sparsities], marker="o", label=v.name)
        ax.set_title(f"output error, {mask} mask")
    if results["perplexity"]:
        ppl = {(r["sparsity"], r["variant"]): r["perplexity"] for r in results["perplexity"]}
        ax = axes[-1]
        for v in variants(cfg):
            if (cfg.sparsities[0], v.name) in ppl:
                ax.plot(xs, [ppl[(s, v.name)] for s in cfg.sparsities], marker="o", label=v.name)
        ax.axhline(ppl[(0.0, "dense")], color="k", lw=0.8, ls="--", label="dense")
        ax.set_title("perplexity, causal, every layer sparse")
    for ax in axes:
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return {"tail.png": fig}


def main(argv=None) -> dict:
    cfg = harness.parse_config(get_config, argv, description=__doc__, presets=tuple(PRESETS))
    results = run(cfg, argv)
    table = write_table(results, cfg)
    harness.report_study(cfg.out, results, table, plot(results, cfg))
    return results


if __name__ == "__main__":
    main()
