"""Dual context (SPEC §8 "Dual-Context"): one image and one prompt guide the same image.

Text strength τ gives the text context ratio τ and the image context 1 − τ (SPEC §4.3 attention
mixing, SPEC §7.3 guidance per context). An empty prompt or τ = 0 is plain image variation
guidance; τ = 1 leaves only the text (the official still evaluates the image at ratio 0).
"""

from __future__ import annotations

import torch

from ..errors import VDInputError
from .context_builders import check_images, image_context, mix_contexts, text_context
from .image_prep import resize_images, resolve_output_size
from .options import SamplingOptions
from .result import ImageFlowResult, decode_images
from .sampling import check_count, check_image_size, sample_image


def check_text_strength(text_strength: float) -> None:
    if not 0.0 <= text_strength <= 1.0:
        raise VDInputError(f"text strength must be between 0 (image only) and 1 (text only), got {text_strength}")


@torch.no_grad()
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
        focus: the image context's semantic ↔ style focus (SPEC §8.1).
        width, height: output size; default from the image's aspect ratio (longer side 512).
        options, init_latent, denoise: as for ``text_to_image``.

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images and their latents.
    """
    options = options or SamplingOptions()
    purpose = "dual-context generation"
    check_images(image)
    check_count(n)
    check_text_strength(text_strength)
    width, height = resolve_output_size(image, width, height)
    check_image_size(width, height)
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    image_vae = models.require("image_vae", purpose)
    image_group = (image_context(clip, resize_images(image, width, height), focus=focus),)
    if prompt and text_strength > 0:  # the official order: text entry first (SPEC §8)
        contexts = mix_contexts([(text_context(clip, prompt, negative),), image_group], [text_strength, 1 - text_strength])
    else:
        contexts = image_group
    latents = sample_image(
        diffuser, contexts, width=width, height=height, n=n, options=options, init_latent=init_latent, denoise=denoise
    )
    return decode_images(image_vae, latents)
