"""Image → text (algorithm.md §8 "Image-to-Text"): CLIP-image(image) against CLIP-image(black image),
text flow, Optimus decode."""

from __future__ import annotations

import torch

from ..errors import VDInputError
from .context_builders import check_images, image_context
from .options import SamplingOptions
from .result import decode_texts
from .sampling import check_count, make_noise, sample_text


@torch.no_grad()
def image_to_text(
    models,
    image: torch.Tensor,
    n: int = 4,
    clean_up: bool = True,
    options: SamplingOptions | None = None,
) -> list[str]:
    """Describe ``image`` with ``n`` sampled sentences.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and Optimus.
        image: ``(1 | n, 3, H, W)`` in [0, 1], any size: CLIP resizes and centre-crops it itself
            (algorithm.md §5.2), so it is not squashed to 512×512 first as in the WebUI.
        n: number of sentences (the WebUI's 4).
        clean_up: remove immediately repeated words/phrases (the WebUI does, algorithm.md §8.3).
        options: sampling options (official defaults when ``None``).

    Returns:
        ``n`` strings.
    """
    options = options or SamplingOptions()
    purpose = "image-to-text"
    check_images(image)
    check_count(n)
    if image.shape[0] not in (1, n):
        raise VDInputError(f"image-to-text got {image.shape[0]} images for {n} sentences; give 1 image or {n}")
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    optimus = models.require("optimus", purpose)
    contexts = [image_context(clip, image)]  # no focus; the text flow contrasts with the black image
    noise = make_noise(options, n)
    latents = sample_text(diffuser, contexts, n=n, options=options, noise=noise)
    return decode_texts(optimus, latents, noise, clean_up)
