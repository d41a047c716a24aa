"""What the flows return, and the shared decode steps: images (algorithm.md §6.1, §8.2) and texts
(algorithm.md §6.2, §8.3)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..caption_cleanup import remove_duplicate_words
from ..color_match import match_color_simple
from ..errors import VDInputError
from ..samplers import NoiseSource

COLOR_ADJUST_CHOICES = ("none", "simple")


class ImageFlowResult(NamedTuple):
    """Decoded images and the latents they came from.

    Attributes:
        images: ``(n, 3, H, W)`` float in [0, 1].
        latents: ``(n, 4, H/8, W/8)`` unscaled kl-f8 latents (ComfyUI's LATENT convention).
    """

    images: torch.Tensor
    latents: torch.Tensor


def check_color_adjust(color_adjust: str) -> str:
    """Normalise a colour-adjustment choice (``"none"``/``"simple"``, any case: the WebUI says "Simple")."""
    choice = str(color_adjust).lower()
    if choice not in COLOR_ADJUST_CHOICES:
        raise VDInputError(f"color_adjust must be one of {', '.join(COLOR_ADJUST_CHOICES)}, got {color_adjust!r}")
    return choice


def decode_images(image_vae, latents: torch.Tensor, color_reference: torch.Tensor | None = None) -> ImageFlowResult:
    """Decode unscaled latents; with ``color_reference`` ``(1 | n, 3, H, W)``, match colours to it
    (the WebUI's "Simple" adjustment, algorithm.md §8.2)."""
    images = image_vae.decode(latents)
    if color_reference is not None:
        images = match_color_simple(images, color_reference.to(device=images.device, dtype=images.dtype))
    return ImageFlowResult(images, latents)


def decode_texts(optimus, latents: torch.Tensor, noise: NoiseSource, clean_up: bool = True,
                 **decode_options) -> list[str]:
    """Sample one sentence per text latent ``(n, L)`` with the official Optimus sampler.

    The tokens are drawn from the run's generators (``noise.split``), continuing after the
    diffusion steps as the WebUI's global RNG does (algorithm.md §7.4); with per-item seeds,
    sentence i uses item i's generator. ``clean_up`` applies the WebUI's duplicate-word removal
    (algorithm.md §8.3); ``decode_options`` go to ``OptimusVAE.decode`` (temperature, greedy, max_length).
    """
    texts = [text for rows, generator in noise.split(latents.shape[0])
             for text in optimus.decode(latents[rows], generator=generator, **decode_options)]
    return [remove_duplicate_words(t) if clean_up else t for t in texts]
