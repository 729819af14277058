"""Write docs/support.md: what each implementation of ``baatt.attention`` accepts and supports.

    python scripts/support_matrix.py           # rewrite docs/support.md
    python scripts/support_matrix.py --check   # exit 1 if docs/support.md is not what this writes

The input limits (dtypes, head dims, block sizes) come from ``baatt.support_matrix()``,
which probes each implementation's own rules; ``tests/test_api.py`` fails when the
committed file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baatt  # noqa: E402

DOC = ROOT / "docs" / "support.md"

# What each implementation needs beside its inputs (its why_unavailable asks the machine) and how
# its gradient is computed. Prose: the machine is not an input rule that can be probed.
MACHINE = {
    "mosaic_gpu": "a Hopper GPU (sm90)",
    "pallas": "a CUDA GPU (Triton lowering); any machine with `interpret=True` (slow, for tests)",
    "reference": "anything JAX runs on",
}
GRADIENT = {
    "mosaic_gpu": "Mosaic GPU kernels (key blocks 128, 256); the Pallas kernels for key blocks of 64",
    "pallas": "Pallas (Triton) kernels",
    "reference": "JAX autodiff",
}


def _sizes(values) -> str:
    return "powers of two >= 8" if values is None else ", ".join(map(str, values))


def render() -> str:
    """The whole text of docs/support.md."""
    table = baatt.support_matrix()
    rows = []
    for name, s in table.items():
        head_dims = "any" if s.head_dims is None else ", ".join(map(str, s.head_dims))
        v_dim = "any" if s.v_head_dim_may_differ else "that of q and k"
        rows.append(f"| `\"{name}\"` | {', '.join(s.dtypes)} | {head_dims} | {v_dim} | {_sizes(s.block_q)} | "
                    f"{_sizes(s.block_k)} |")
    machines = [f"| `\"{name}\"` | {MACHINE.get(name, '')} | {GRADIENT.get(name, '')} |" for name in table]
    return "\n".join([
        "# Support",
        "",
        "<!-- Written by scripts/support_matrix.py from baatt.support_matrix(); do not edit by hand. -->",
        "",
        "What `baatt.attention(..., implementation=name)` accepts, from each implementation's own",
        "rules (`baatt.support_matrix()`). With `implementation=None` the first implementation of",
        "this list that accepts the inputs and runs on the machine is taken; one asked for by name",
        "that cannot run raises `baatt.ImplementationUnavailable` with every reason.",
        "",
        "| implementation | dtypes | head dim of q, k | head dim of v | block_q | block_k |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Block sizes are `BAConfig.block_size` / `block_size_k` (`BAConfig` accepts powers of two",
        ">= 8). GQA (kv heads dividing query heads), ragged lengths and `key_mask` padding are",
        "supported by every implementation.",
        "",
        "| implementation | runs on | gradient |",
        "|---|---|---|",
        *machines,
        "",
        "## Transforms",
        "",
        "Every implementation runs under `jax.jit`, `jax.vmap`, `jax.grad` (first order),",
        "`jax.checkpoint`, `jax.lax.scan` and `nnx.jit` (through `baatt.nn.ba_attention_fn`);",
        "`tests/test_conformance.py` checks each against `jax.nn.dot_product_attention`.",
        "",
        "- Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) and second-order derivatives",
        "  (grad of grad, `jax.hessian`) need `implementation=\"reference\"`: the kernels define a",
        "  first-order VJP only, and raise a clear error otherwise.",
        "- Value rules (NaN/Inf inputs, a selection's ids) raise a `ValueError` in an eager call;",
        "  under a transform they make the affected output rows NaN, as `jax.nn` propagates",
        "  non-finite inputs, and `debug_checks=True` turns them into `jax.experimental.checkify`",
        "  errors.",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/support.md instead of writing it")
    args = parser.parse_args()
    text = render()
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} is out of date: run python scripts/support_matrix.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
