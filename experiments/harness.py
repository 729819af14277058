"""What every experiment shares: configuration from the command line, GPU timing, run records,
benchmark inputs and the dense baselines.

- ``parse_config``: an experiment's frozen-dataclass configuration, one ``--flag`` per field.
- ``median_time``: the timing loop of every speed benchmark.
- ``run_metadata``, ``describe_run``, ``write_results``: what each result records about its run
  (device, jax version, full commit, date, command) and where it goes
  (``experiments/results/<study>/``: JSON, markdown tables, PNG figures).
- ``synthetic_inputs``, ``random_selection``: the benchmarks' Q/K/V (``baatt.synthetic``, the
  structured inputs of the approximation-error study) and random block selections.
- ``dense_attention``, ``dense_attention_fwdbwd``, ``dense_backward_call``: cuDNN through
  ``jax.nn.dot_product_attention``; ``flash_attention2_times``: FlashAttention-2 through torch.

``python -m experiments.harness flash-attention-2 SPEC OUT`` is the child process that
``flash_attention2_times`` starts; it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform as python_platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from baatt import platform, synthetic

RESULTS_DIR = "experiments/results"  # relative to the repository root, where experiments run from


def study_dir(study: str) -> str:
    """Default output folder of a study's runs."""
    return f"{RESULTS_DIR}/{study}"


# ----------------------------------------------------------------------------- configuration


def option(default, help: str, **argparse_kwargs):
    """A config field with its command-line help (and argparse extras such as ``choices``)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false; got {text!r}")


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _scalar_parser(tp) -> Callable[[str], object] | None:
    """str -> value for int, float, str, bool and unions of them (``None`` spelled "none"); None otherwise."""
    if tp in (int, float, str):
        return tp
    if tp is bool:
        return _parse_bool
    if not _is_union(tp):
        return None
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    parsers = [_scalar_parser(a) for a in members]
    if any(p is None for p in parsers):
        return None
    optional = len(members) < len(typing.get_args(tp))

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        for p in parsers:
            try:
                return p(text)
            except ValueError:
                pass
        names = " or ".join(m.__name__ for m in members) + (" or none" if optional else "")
        raise ValueError(f"expected {names}; got {text!r}")

    return parse


@dataclasses.dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]  # field names from the top config down
    convert: Callable[[object], object]  # argparse's value -> the field's value
    help: str
    choices: tuple | None  # allowed values (of each element, for a tuple field)
    argparse_kwargs: dict

    @property
    def name(self) -> str:
        return "--" + self.path[-1].replace("_", "-")


def _tuple_converter(tp, parser: Callable[[str], object] | None):
    """Converter of a tuple field's tokens (values separated by spaces or commas), or None when its
    element types have no command-line form. ``parser`` (one value at a time) overrides the types."""
    args = typing.get_args(tp)
    variadic = not args or args[-1] is Ellipsis
    parsers = [] if parser is not None else [_scalar_parser(a) for a in (args[:1] if variadic else args)]
    if parser is None and (not parsers or None in parsers):
        return None

    def convert(tokens):
        values = [v for tok in tokens for v in tok.split(",") if v]
        if parser is not None:
            return tuple(parser(v) for v in values)
        if variadic:
            return tuple(parsers[0](v) for v in values)
        if len(values) != len(parsers):
            raise ValueError(f"takes {len(parsers)} values; got {len(values)}")
        return tuple(p(v) for p, v in zip(parsers, values))

    return convert


def _none_or(convert):
    """Lets an optional tuple field take the single value "none"."""
    return lambda tokens: None if [t.lower() for t in tokens] == ["none"] else convert(tokens)


def _flags(cls, parsers: Mapping[str, Callable[[str], object]], skip: set[str], prefix=()) -> list[_Flag]:
    """One flag per field of ``cls``; fields that are dataclasses contribute their own fields."""
    hints = typing.get_type_hints(cls)
    flags = []
    for field in dataclasses.fields(cls):
        name, tp = field.name, hints[field.name]
        if name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            flags += _flags(tp, parsers, skip, prefix + (name,))
            continue
        kwargs = {k: v for k, v in field.metadata.items() if k not in ("help", "choices")}
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if choices is not None:
            help_text = f"{help_text}; one of: {', '.join(map(str, choices))}".lstrip("; ")
        optional = _is_union(tp) and type(None) in typing.get_args(tp)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
        if tp is bool:
            flags.append(_Flag(prefix + (name,), bool, help_text, None,
                               dict(action=argparse.BooleanOptionalAction, **kwargs)))
            continue
        if len(inner) == 1 and typing.get_origin(inner[0]) is tuple:
            convert = _tuple_converter(inner[0], parsers.get(name))
            kwargs["nargs"] = "+"
            if convert is not None and optional:
                convert = _none_or(convert)
        else:
            convert = parsers.get(name) or _scalar_parser(tp)
        kwargs.setdefault("metavar", name.upper())
        if convert is None:
            raise TypeError(f"{cls.__name__}.{name}: type {tp} has no command-line form; give parse_config a "
                            "parser for it or list it in not_on_cli")
        flags.append(_Flag(prefix + (name,), convert, help_text, choices, kwargs))
    return flags


def _get(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def _replace(obj, overrides: Mapping[tuple[str, ...], object]):
    """``obj`` with the values at the given field paths replaced (nested dataclasses rebuilt)."""
    top = {path[0]: value for path, value in overrides.items() if len(path) == 1}
    nested: dict[str, dict] = {}
    for path, value in overrides.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    top.update({name: _replace(getattr(obj, name), sub) for name, sub in nested.items()})
    return dataclasses.replace(obj, **top)


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(get_config: Callable[..., object], argv: Sequence[str] | None = None, *, description: str,
                 presets: Sequence[str] = (), parsers: Mapping[str, Callable[[str], object]] | None = None,
                 not_on_cli: Sequence[str] = ()):
    """The configuration ``get_config()`` returns, with the flags given in ``argv`` applied.

    Every field of the (frozen) dataclass is a flag ``--field-name``, fields of a nested dataclass
    under their own names: booleans as ``--x`` / ``--no-x``, tuples as values separated by spaces
    or commas, ``none`` for None where the type allows it. ``parsers`` convert the fields whose
    type has no such form (one call per value of a tuple); ``not_on_cli`` names fields left off.
    With ``presets`` (the names ``get_config`` takes, its default first), ``--preset NAME`` picks
    the starting point ``get_config(NAME)``; a field named ``preset`` is then set by
    ``get_config``, not by a flag. ``--print-config`` prints the result as JSON and exits.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    base = get_config()
    if presets:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", choices=tuple(presets))
        chosen, _ = pre.parse_known_args(argv)
        if chosen.preset is not None:
            base = get_config(chosen.preset)
    module = sys.modules[get_config.__module__].__spec__.name  # "experiments.x", also when run as __main__
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        ap.add_argument("--preset", choices=tuple(presets), help=f"starting configuration (default: {presets[0]})")
    ap.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    skip = set(not_on_cli) | ({"preset"} if presets else set())
    flags = _flags(type(base), parsers or {}, skip)
    seen: dict[str, _Flag] = {}
    for flag in flags:
        if flag.name in seen:
            raise TypeError(f"two config fields would share the flag {flag.name}: "
                            f"{'.'.join(seen[flag.name].path)} and {'.'.join(flag.path)}")
        seen[flag.name] = flag
        default = f"(default: {_show(_get(base, flag.path))})"
        ap.add_argument(flag.name, dest=".".join(flag.path), default=argparse.SUPPRESS,
                        help=f"{flag.help} {default}".strip(), **flag.argparse_kwargs)
    given = vars(ap.parse_args(argv))
    overrides = {}
    for flag in flags:
        dest = ".".join(flag.path)
        if dest in given:
            try:
                value = flag.convert(given[dest])
            except ValueError as e:
                ap.error(f"argument {flag.name}: {e}")
            values = value if isinstance(value, tuple) else (value,)
            wrong = [v for v in values if flag.choices is not None and v is not None and v not in flag.choices]
            if wrong:
                allowed = ", ".join(map(str, flag.choices))
                ap.error(f"argument {flag.name}: must be one of {allowed}; got {wrong[0]!r}")
            overrides[flag.path] = value
    try:
        config = _replace(base, overrides)
    except (TypeError, ValueError) as e:
        ap.error(str(e))
    if given["print_config"]:
        print(json.dumps(dataclasses.asdict(config), indent=1, default=str))
        raise SystemExit(0)
    return config


# ----------------------------------------------------------------------------- timing


def median_time(call: Callable[[], object], *, target_s: float, min_reps: int,
                sync: Callable[[object], object] = jax.block_until_ready) -> float:
    """Median seconds per ``call()``: one warm-up (compiling) call, one timed call to size the
    rest, then at least ``min_reps`` batches of calls (amortising dispatch) within about
    ``target_s``, each batch timed up to a ``sync`` of its last result."""
    sync(call())
    t0 = time.perf_counter()
    sync(call())
    estimate = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(50, int(0.02 / estimate)))
    reps = max(min_reps, min(25, int(target_s / (estimate * inner))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = call()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


# ----------------------------------------------------------------------------- run records


def git_commit() -> str:
    """Full hash of the checked-out commit. ``BAATT_COMMIT`` names it for a source tree copied
    without its git metadata; "unknown" when neither is available."""
    if os.environ.get("BAATT_COMMIT"):
        return os.environ["BAATT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out if len(out) == 40 else "unknown"


def run_metadata(module: str, argv: Sequence[str] | None = None, **extra) -> dict:
    """What every result records about its run: device, jax and Python versions, full commit, date
    (ISO 8601, UTC) and the command that reproduces it (``python -m <module> <argv>``), then ``extra``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(device=platform.device_kind(), jax_version=jax.__version__,
                python=python_platform.python_version(), commit=git_commit(),
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                command=shlex.join(["python", "-m", module, *args]), **extra)


def format_length(tokens: int) -> str:
    """A sequence length for a table: "32K" from 1024 tokens up, the plain count below."""
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def describe_run(meta: Mapping) -> str:
    """Device, jax version, short commit and date of a run, for a table's heading."""
    return f"{meta['device']}, jax {meta['jax_version']}, commit {meta['commit'][:10]}, {meta['date']}"


def write_results(out_dir: str | os.PathLike, files: Mapping[str, object]) -> list[Path]:
    """Writes each ``name: content`` under ``out_dir`` (created if missing) by the name's suffix:
    ``.json`` as JSON, ``.md`` as text, ``.png`` a matplotlib figure (closed afterwards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = out / name
        if path.suffix == ".json":
            path.write_text(json.dumps(content, indent=1, default=str))
        elif path.suffix == ".md":
            path.write_text(content)
        elif path.suffix == ".png":
            import matplotlib.pyplot as plt

            content.savefig(path, dpi=110)
            plt.close(content)
        else:
            raise ValueError(f"write_results writes .json, .md and .png files; got {name!r}")
        paths.append(path)
    return paths


def report_study(out_dir: str | os.PathLike, results: dict, table: str,
                 figures: Mapping[str, object] | None = None) -> list[Path]:
    """A study's ending: ``results.json``, ``table.md`` and ``figures`` (name -> matplotlib figure)
    under ``out_dir``, then the table and the files written (with the run's seconds) on stdout."""
    paths = write_results(out_dir, {"results.json": results, "table.md": table, **(figures or {})})
    print()
    print(table)
    print(f"wrote {', '.join(map(str, paths))} in {results['meta']['seconds']} s")
    return paths


# ----------------------------------------------------------------------------- inputs


def synthetic_inputs(length: int, *, heads: int, head_dim: int, dtype, batch: int = 1, kv_heads: int | None = None,
                     seed: int | None = None):
    """q [B, L, H, D], k and v [B, L, Hkv, D] from ``baatt.synthetic.attention_inputs`` (topic
    segments, a local band, heavy-tailed norms, sink keys) in ``dtype``, seeded by the length
    unless ``seed`` is given: every benchmark sees the same inputs at the same length. On a GPU
    the same model is drawn on the device (``attention_inputs_on_device``): the host generator
    would spend minutes of the benchmark's time per long length."""
    cfg = synthetic.SyntheticConfig(batch=batch, length=length, q_heads=heads, kv_heads=kv_heads or heads,
                                    head_dim=head_dim, seed=length if seed is None else seed)
    generate = synthetic.attention_inputs_on_device if platform.has_gpu() else synthetic.attention_inputs
    return generate(cfg, dtype=jnp.dtype(dtype))


def random_selection(key, counts, num_k_blocks: int, width: int | None = None):
    """Random distinct key-block ids, ``counts[...]`` of them per row, ascending, padded to
    ``width`` (default ``num_k_blocks``) by repeating the row's last id: the layout of
    ``baatt.select_blocks``'s indices."""
    width = num_k_blocks if width is None else width
    order = jnp.argsort(jax.random.uniform(key, counts.shape + (num_k_blocks,)), axis=-1).astype(jnp.int32)
    live = jnp.arange(num_k_blocks) < counts[..., None]
    kept = jnp.sort(jnp.where(live, order, num_k_blocks), axis=-1)[..., :width]
    last = jnp.take_along_axis(kept, (counts - 1)[..., None], axis=-1)
    return jnp.where(jnp.arange(width) < counts[..., None], kept, last).astype(jnp.int32)


# ----------------------------------------------------------------------------- dense baselines


def dense_attention(implementation: str = "cudnn"):
    """Jitted ``jax.nn.dot_product_attention(q, k, v, implementation=...)``: cuDNN's fused
    attention on a GPU (``"xla"`` where there is no cuDNN, e.g. CPU smoke runs)."""
    return jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=implementation))


def dense_attention_fwdbwd(implementation: str = "cudnn"):
    """Jitted ``(q, k, v, do) -> (out, (dq, dk, dv))``: the dense forward and its vjp applied to ``do``."""
    forward = functools.partial(jax.nn.dot_product_attention, implementation=implementation)

    @jax.jit
    def fwdbwd(q, k, v, do):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(do)

    return fwdbwd


def dense_backward_call(q, k, v, do, implementation: str = "cudnn") -> Callable[[], object]:
    """Argument-free call of the dense backward alone: the vjp of the dense forward (forward and
    residuals computed here, once) applied to ``do``."""
    forward = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    _, vjp_fn = jax.jit(lambda q, k, v: jax.vjp(forward, q, k, v))(q, k, v)
    apply = jax.jit(lambda fn, do: fn(do))
    return lambda: apply(vjp_fn, do)


def flash_attention2_times(lengths: Sequence[int], *, batch: int, heads: int, head_dim: int, dtype: str,
                           target_s: float, min_reps: int, causal: bool = False) -> dict | None:
    """FlashAttention-2 (torch SDPA, flash backend) forward and forward+backward milliseconds per
    length on [B, H, L, D] ``torch.randn`` inputs (a dense kernel's time does not depend on the
    values), measured with ``median_time`` in a child process so that torch and JAX never share
    the GPU's memory pool: call it before JAX has touched the GPU in this process (JAX reserves
    most of the memory when it starts). ``causal``: SDPA's ``is_causal=True``. Returns ``{"torch", "torch_device", "fa2": {str(L):
    {"fwd_ms", "fwdbwd_ms"}}}``, or None when the child fails (no torch, no GPU; its output says why).
    """
    spec = dict(lengths=list(lengths), batch=batch, heads=heads, head_dim=head_dim, dtype=dtype,
                target_s=target_s, min_reps=min_reps, causal=causal)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fa2.json"
        done = subprocess.run([sys.executable, "-m", "experiments.harness", "flash-attention-2", json.dumps(spec),
                               str(path)])
        if done.returncode != 0 or not path.exists():
            return None
        return json.loads(path.read_text())


def _time_flash_attention2(spec: dict, out_path: str) -> None:
    """The child of ``flash_attention2_times``: torch only (JAX is imported but never started here)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = getattr(torch, spec["dtype"])
    result = {"torch": torch.__version__, "torch_device": torch.cuda.get_device_name(), "fa2": {}}

    def sync(_):
        torch.cuda.synchronize()

    tm = functools.partial(median_time, sync=sync, target_s=spec["target_s"], min_reps=spec["min_reps"])
    for length in spec["lengths"]:
        gen = torch.Generator(device="cuda").manual_seed(length)
        shape = (spec["batch"], spec["heads"], length, spec["head_dim"])
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fwd = tm(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=spec["causal"]))
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def fwdbwd():
                out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=spec["causal"])
                out.backward(do)
                qg.grad = kg.grad = vg.grad = None
                return out

            both = tm(fwdbwd)
        result["fa2"][str(length)] = {"fwd_ms": fwd * 1e3, "fwdbwd_ms": both * 1e3}
        print(f"[fa2] L={length} fwd {fwd * 1e3:.2f} ms fwd+bwd {both * 1e3:.2f} ms", flush=True)
        q = k = v = do = qg = kg = vg = None  # frees device memory before the next size
        torch.cuda.empty_cache()
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] != ["flash-attention-2"] or len(sys.argv) != 4:
        sys.exit("usage: python -m experiments.harness flash-attention-2 SPEC_JSON OUT_PATH "
                 "(started by flash_attention2_times)")
    _time_flash_attention2(json.loads(sys.argv[2]), sys.argv[3])
