"""Where baatt runs: device detection in one place.

Every backend, selector and test asks here instead of walking ``jax.devices()``
itself, so "is there a GPU" and "is it a Hopper" have one answer.
"""

from __future__ import annotations

import functools

import jax


@functools.cache
def gpu_devices() -> tuple[jax.Device, ...]:
    """The CUDA devices JAX sees (empty on a CPU-only machine)."""
    try:
        return tuple(d for d in jax.devices() if d.platform == "gpu")
    except RuntimeError:
        return ()


def has_gpu() -> bool:
    """True when at least one CUDA GPU is visible to JAX."""
    return bool(gpu_devices())


def compute_capability() -> str | None:
    """Compute capability of the first GPU (e.g. ``"9.0"``), or None without one."""
    gpus = gpu_devices()
    return None if not gpus else getattr(gpus[0], "compute_capability", None)


def hopper_reason() -> str | None:
    """None when a Hopper (sm90) GPU is present, else why not (for ``why_unavailable`` messages)."""
    if not has_gpu():
        return "no CUDA GPU found (the Mosaic GPU kernels need an sm90 GPU)"
    cc = compute_capability()
    if cc is None or not str(cc).startswith("9"):
        return f"the Mosaic GPU kernels are built for sm90 (Hopper); this GPU reports compute capability {cc}"
    return None


def device_kind() -> str:
    """Human-readable name of the default device ("cpu" on a CPU-only machine)."""
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind
