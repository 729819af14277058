"""Kernel backends of ``baatt.attention``: ``BACKENDS`` lists each backend's ``Implementation``.

* ``base.py``: the ``Implementation`` record every backend exports as ``IMPLEMENTATION``;
* ``common.py``: what the backends share (softmax constants, key masking, selection lists,
  the backward's row terms);
* ``pallas_triton/``: portable Pallas kernels (Triton lowering, or interpret mode anywhere);
* ``mosaic_gpu/``: Hopper (sm90) kernels in Pallas Mosaic GPU.

Nothing here imports ``baatt.api``: the registry there reads ``BACKENDS``.
"""

from baatt.kernels import mosaic_gpu, pallas_triton

BACKENDS = (pallas_triton.IMPLEMENTATION, mosaic_gpu.IMPLEMENTATION)

__all__ = ["BACKENDS"]
