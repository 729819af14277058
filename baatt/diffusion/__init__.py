"""Masked diffusion: forward process, loss, and the iterative-unmasking sampler."""

from baatt.diffusion.masking import diffusion_loss, forward_process, masked_ce
from baatt.diffusion.sampler import SampleResult, generate, schedule

__all__ = ["SampleResult", "diffusion_loss", "forward_process", "generate", "masked_ce", "schedule"]
