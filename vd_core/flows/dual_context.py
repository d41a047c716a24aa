"""Dual context (algorithm.md §8 "Dual-Context"): one image and one prompt guide the same image.

Text strength τ gives the text context ratio τ and the image context 1 − τ (algorithm.md §4.3 attention
mixing, algorithm.md §7.3 guidance per context). An empty prompt or τ = 0 is plain image variation
guidance; τ = 1 leaves only the text (the official still evaluates the image at ratio 0).
It is multi-context generation with a single, unmasked image slot of weight 1.
"""

from __future__ import annotations

import torch

from .multi_context import ImageSlot, multi_context
from .options import SamplingOptions
from .result import ImageFlowResult


def dual_context(
    models,
    prompt: str,
    image: torch.Tensor,
    text_strength: float = 0.0,
    focus: float = 0.5,
    negative: str = "",
    n: int = 2,
    width: int | None = None,
    height: int | None = None,
    options: SamplingOptions | None = None,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
) -> ImageFlowResult:
    """Generate ``n`` images guided by ``image`` and ``prompt``.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and the image VAE.
        prompt: the text context (may be empty); negative: its unconditional prompt.
        image: ``(1 | n, 3, H, W)`` in [0, 1].
        text_strength: τ ∈ [0, 1], the WebUI's "Text Domination".
        focus: the image context's semantic ↔ style focus (algorithm.md §8.1).
        width, height: output size; default from the image's aspect ratio (longer side 512).
        options, init_latent, denoise: as for ``text_to_image``.

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images and their latents.
    """
    return multi_context(
        models, prompt, [ImageSlot(image, focus=focus)], text_strength, negative=negative, n=n, width=width,
        height=height, options=options, init_latent=init_latent, denoise=denoise,
    )
