"""Guided contexts: what a VD flow is conditioned on.

A flow is conditioned on one or more contexts (algorithm.md §4.3, §7.3). Each carries its conditional
tokens, the unconditional tokens classifier-free guidance contrasts them with, and a mixing ratio.
Ratios are normalised to sum 1 by the diffuser, so strengths (0.3, 0.7) and (3, 7) mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from .errors import VDInputError

ContextKind = Literal["image", "text"]


@dataclass(frozen=True)
class GuidedContext:
    """One context entry.

    Attributes:
        kind: ``"text"`` (CLIP text tokens, N = 77) or ``"image"`` (CLIP image tokens, N = 257·k).
            It selects the diffuser's context layers (algorithm.md §1: by the context's type).
        cond: ``(1 | B, N, D)`` conditional tokens.
        uncond: ``(1 | B, N, D)`` unconditional tokens: the empty prompt for text, zeros for images
            (official image-variation and dual/multi-context), or a negative prompt.
        ratio: mixing weight ≥ 0 among several contexts.
        text_flow_uncond: optional ``(1 | B, N, D)`` tokens used instead of ``uncond`` when the data
            is text: the official image→text flow contrasts with the CLIP context of a black image.
    """

    kind: ContextKind
    cond: torch.Tensor
    uncond: torch.Tensor
    ratio: float = 1.0
    text_flow_uncond: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in ("image", "text"):
            raise VDInputError(f"context kind must be 'image' or 'text', not {self.kind!r}")
        if self.cond.dim() != 3 or self.uncond.shape[1:] != self.cond.shape[1:]:
            raise VDInputError(
                f"{self.kind} context: cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} "
                "must both be (B, N, D) with the same N and D"
            )
        if self.ratio < 0:
            raise VDInputError(f"{self.kind} context: ratio must be ≥ 0, got {self.ratio}")

    def uncond_for(self, data_kind: ContextKind) -> torch.Tensor:
        """The unconditional tokens to use when the data is ``data_kind``."""
        if data_kind == "text" and self.text_flow_uncond is not None:
            return self.text_flow_uncond
        return self.uncond

    def with_ratio(self, ratio: float) -> "GuidedContext":
        return replace(self, ratio=ratio)
