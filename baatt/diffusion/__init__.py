"""Masked diffusion: forward process, loss, the iterative-unmasking sampler and its sparse-attention recipe."""

from baatt.diffusion.budgets import PromptGenParams
from baatt.diffusion.masking import diffusion_loss, forward_process, masked_ce
from baatt.diffusion.sampler import SampleResult, generate, schedule

__all__ = ["PromptGenParams", "SampleResult", "diffusion_loss", "forward_process", "generate", "masked_ce", "schedule"]
