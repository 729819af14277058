"""Digest of every lowered Mosaic GPU kernel module, for refactoring the kernels without a GPU.

    PYTHONPATH=. python3 scripts/mosaic_digest.py > before.json   # then refactor, and
    PYTHONPATH=. python3 scripts/mosaic_digest.py > after.json && diff before.json after.json

Exports the forward and the forward+backward of ``baatt.kernels.mosaic_gpu`` for
cuda (``jax.export``, no GPU needed) over a grid of variants (both layouts, GQA
groups 1 to 4, key mask, dtypes, head dims, block sizes, non-default tunings, causal and block-causal masks), captures each
Mosaic GPU module just before it is serialised, prints it without source
locations and without its per-process dump name, and hashes it. A refactor that leaves every digest unchanged lowers
to the same kernels; one that changes a digest changed that variant's kernel.
``--quick`` runs three variants. Uses a private hook of jax's Mosaic GPU
lowering (``jax.experimental.mosaic.gpu.core._run_serde_pass``), pinned with jax 0.11.2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.experimental.mosaic.gpu.core as mosaic_core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

from baatt.attention_mask import CAUSAL, AttentionMask  # noqa: E402
from baatt.kernels import mosaic_gpu as mgpu  # noqa: E402

L = 512


def _sd(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def variants(quick: bool = False):
    """(name, function, argument specs): forward and forward+backward of each configuration."""
    out = []

    def add(name, attend, *args):
        out.append((f"{name}_fwd", attend, args))
        grads = jax.grad(lambda *a: jnp.sum(attend(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2))
        out.append((f"{name}_bwd", grads, args))

    configs = [(hq, hkv, dt, d) for hq, hkv in [(2, 2), (4, 2)] for dt in [jnp.bfloat16, jnp.float16] for d in [128]]
    configs += [(4, 2, jnp.bfloat16, 64), (4, 1, jnp.bfloat16, 128)]
    for hq, hkv, dt, d in configs[:1] if quick else configs:
        tag = f"{hq}{hkv}_{jnp.dtype(dt).name}_d{d}"
        idx, cnt = _sd(1, hq, L // 128, 3, dtype=jnp.int32), _sd(1, hq, L // 128, dtype=jnp.int32)
        add(f"positional_{tag}",
            lambda q, k, v, i, c: mgpu.positional_attention(q, k, v, i, c, scale=0.1, block_q=128, block_k=128),
            _sd(1, L, hq, d, dtype=dt), _sd(1, L, hkv, d, dtype=dt), _sd(1, L, hkv, d, dtype=dt), idx, cnt)
        add(f"block_space_masked_{tag}",
            lambda q, k, v, m, i, c: mgpu.block_sparse_attention(q, k, v, m, i, c, scale=0.1, block_q=128,
                                                                 block_k=128),
            _sd(1, hq, L, d, dtype=dt), _sd(1, hkv, L, d, dtype=dt), _sd(1, hkv, L, d, dtype=dt),
            _sd(1, hkv, L, dtype=jnp.bool_), idx, cnt)
    if quick:
        return out[:3]
    tunings = {
        "alt": (mgpu.Tuning(tile_major=False, rotate=False), mgpu.BwdTuning(pingpong=True, rotate=False, tile_major=False)),
        "pingpong": (mgpu.Tuning(stages=2), mgpu.BwdTuning(pingpong=True, dkv_stages=2)),
        "persistent": (mgpu.Tuning(persistent=True, ctas=3), mgpu.BwdTuning()),
    }
    for name, (tn, bt) in tunings.items():
        add(f"tuning_{name}",
            lambda q, k, v, i, c, tn=tn, bt=bt: mgpu.positional_attention(
                q, k, v, i, c, scale=0.1, block_q=128, block_k=128, tuning=tn, backward_tuning=bt),
            _sd(1, L, 4, 128), _sd(1, L, 2, 128), _sd(1, L, 2, 128),
            _sd(1, 4, L // 128, 3, dtype=jnp.int32), _sd(1, 4, L // 128, dtype=jnp.int32))
    for bq, bk in [(256, 256), (256, 128)]:
        add(f"blocks_{bq}_{bk}",
            lambda q, k, v, i, c, bq=bq, bk=bk: mgpu.positional_attention(q, k, v, i, c, scale=0.1, block_q=bq,
                                                                          block_k=bk),
            _sd(1, L, 4, 128), _sd(1, L, 2, 128), _sd(1, L, 2, 128),
            _sd(1, 4, L // bq, 2, dtype=jnp.int32), _sd(1, 4, L // bq, dtype=jnp.int32))
    # Causal masks: token-causal on both layouts (with a key mask in block space), a persistent forward and
    # longer blocks, block-causal.
    masks = {
        "causal": (mgpu.Tuning(), 128, 128, CAUSAL),
        "causal_persistent_256_128": (mgpu.Tuning(persistent=True, ctas=3), 256, 128, CAUSAL),
        "block_causal": (mgpu.Tuning(), 128, 128, AttentionMask.block_causal(256)),
    }
    for name, (tn, bq, bk, mask) in masks.items():
        add(f"{name}_positional",
            lambda q, k, v, i, c, tn=tn, bq=bq, bk=bk, mask=mask: mgpu.positional_attention(
                q, k, v, i, c, scale=0.1, block_q=bq, block_k=bk, tuning=tn, mask=mask),
            _sd(1, L, 4, 128), _sd(1, L, 2, 128), _sd(1, L, 2, 128),
            _sd(1, 4, L // bq, 2, dtype=jnp.int32), _sd(1, 4, L // bq, dtype=jnp.int32))
    add("causal_block_space_masked",
        lambda q, k, v, m, i, c: mgpu.block_sparse_attention(q, k, v, m, i, c, scale=0.1, block_q=128, block_k=128,
                                                             mask=CAUSAL),
        _sd(1, 4, L, 128), _sd(1, 2, L, 128), _sd(1, 2, L, 128), _sd(1, 2, L, dtype=jnp.bool_),
        _sd(1, 4, L // 128, 3, dtype=jnp.int32), _sd(1, 4, L // 128, dtype=jnp.int32))
    return out


def digests(quick: bool = False) -> dict:
    captured = []
    original = mosaic_core._run_serde_pass

    def capture(module, *args, **kwargs):
        if kwargs.get("serialize"):
            text = module.operation.get_asm(enable_debug_info=False)
            # The dump name counts kernels lowered so far in the process: not part of the kernel.
            captured.append(re.sub(r'mosaic_gpu.dump_basename = "[^"]*"', "", text))
        return original(module, *args, **kwargs)

    mosaic_core._run_serde_pass = capture
    try:
        result = {}
        for name, fn, args in variants(quick):
            captured.clear()
            export.export(jax.jit(fn), platforms=["cuda"])(*args)
            if not captured:
                raise RuntimeError(f"{name}: no Mosaic GPU module was lowered")
            result[name] = [hashlib.sha256(text.encode()).hexdigest()[:16] for text in captured]
        return result
    finally:
        mosaic_core._run_serde_pass = original


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three variants only")
    args = ap.parse_args(argv)
    result = digests(args.quick)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
