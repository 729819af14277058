"""Approximation-error metrics (SPEC.md section 3)."""
