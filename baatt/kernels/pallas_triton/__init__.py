"""Portable Pallas (Triton lowering) block-sparse attention; registers ``implementation="pallas"``."""
