"""Sampling options shared by every flow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SAMPLER_NAMES = ("ddim", "euler", "euler_ancestral", "dpmpp_2m")
SCHEDULER_NAMES = ("uniform", "karras")
MAX_GUIDANCE = 100.0  # ComfyUI's KSampler cfg limit; far above it the result is noise or NaN


@dataclass
class SamplingOptions:
    """How to sample. Defaults are the official WebUI's (algorithm.md §8): 50 DDIM steps, η 0, guidance 7.5.

    Attributes:
        steps: number of sampler steps (≥ 1).
        guidance: classifier-free guidance scale (0 … ``MAX_GUIDANCE``; 1 runs the model once, without guidance).
        sampler: one of ``SAMPLER_NAMES``; ``"ddim"`` is the exact official sampler.
        scheduler: sigma spacing for the k-samplers, one of ``SCHEDULER_NAMES`` (DDIM ignores it).
        eta: fresh noise per step: DDIM η, or the ancestral amount for ``euler_ancestral``. None
            takes the sampler's usual value: 0 for DDIM (deterministic, official), 1 for ancestral.
        seed: the user's seed, 0 … 2⁶⁴−1 (ComfyUI's range; sums with the offsets below wrap
            modulo 2⁶⁴, ``validation.generator_seed``). With ``per_item_seeds`` False, one CPU generator seeded with
            ``seed + 100`` (what the WebUI passes to ``torch.manual_seed``) draws all noise for the
            whole batch in the official order, so a WebUI seed reproduces the WebUI's result. With
            True, batch item i draws from its own generator seeded ``seed + i`` (ComfyUI's rule:
            item i of a batch equals a single run with that seed).
        callback: ``callback(step, total, x, x0_estimate)`` after every step (progress, previews).
        cancel: ``cancel() -> bool``, checked between steps; True raises ``vd_core.errors.Cancelled``.
        device, dtype: where and in which precision to sample (None: the diffuser's own).
    """

    steps: int = 50
    guidance: float = 7.5
    sampler: str = "ddim"
    scheduler: str = "uniform"
    eta: float | None = None
    seed: int = 20
    per_item_seeds: bool = False
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None
    cancel: Callable[[], bool] | None = None
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
