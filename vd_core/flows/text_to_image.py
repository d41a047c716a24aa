"""Text → image (algorithm.md §8 "Text-to-Image"): CLIP-text(prompt) against CLIP-text(negative or "")."""

from __future__ import annotations

import torch

from .context_builders import text_context
from .options import SamplingOptions
from .result import ImageFlowResult, decode_images
from .sampling import sample_image


@torch.no_grad()
def text_to_image(
    models,
    prompt: str,
    negative: str = "",
    width: int = 512,
    height: int = 512,
    n: int = 2,
    options: SamplingOptions | None = None,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
) -> ImageFlowResult:
    """Generate ``n`` images of ``prompt``.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and the image VAE.
        prompt: what to draw; negative: the unconditional prompt (the WebUI's is "").
        width, height: output size, positive multiples of 8.
        n: number of images.
        options: sampling options (official defaults when ``None``).
        init_latent: optional unscaled ``(1 | n, 4, height/8, width/8)`` start latent.
        denoise: fraction of the schedule run from ``init_latent`` (see ``sample_image``).

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images in [0, 1] and their latents.
    """
    options = options or SamplingOptions()
    purpose = "text-to-image"
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    image_vae = models.require("image_vae", purpose)
    contexts = [text_context(clip, prompt, negative)]
    latents = sample_image(
        diffuser, contexts, width=width, height=height, n=n, options=options, init_latent=init_latent, denoise=denoise
    )
    return decode_images(image_vae, latents)
