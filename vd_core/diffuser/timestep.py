"""The sinusoidal timestep embedding of algorithm.md §2.1 (cosine half first)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``concat(cos(t·f), sin(t·f))`` with ``f_i = exp(-ln(max_period)·i/half)``, ``half = dim/2``.

    Args:
        t: (B,) model timesteps in [0, 999]; integer or fractional.
        dim: embedding width, even (the image diffuser's model_channels for both data kinds).

    Returns:
        (B, dim) float32 in [-1, 1]; callers cast it to the data dtype (as the official code).
    """
    half = dim // 2
    # The denominator is `half`, not `half - 1` (algorithm.md §2.1); computed in float32 as the official.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
