"""Image editing through text, I2T2I (algorithm.md §10; offline in the Feb 2023 WebUI, restored here).

1. Sample ``n`` Optimus text latents from the image (the image→text flow).
2. Edit them in the Optimus latent space: remove the component along the negative prompt's latent
   and add the positive prompt's latent.
3. Decode the edited latents to sentences.
4. Generate images guided by two contexts: the sentences followed by the positive prompt (154 text
   tokens, ratio 0.67) and the image's 256 local CLIP tokens reduced to rank 10 (ratio 0.33).
"""

from __future__ import annotations

import logging

import torch

from ..contexts import GuidedContext
from ..errors import VDInputError
from ..focus import low_rank_tokens
from .context_builders import black_image_context, check_images, image_context
from .image_prep import resize_images, resolve_output_size
from .options import SamplingOptions
from .result import ImageFlowResult, check_color_adjust, decode_images, decode_texts
from .sampling import check_count, check_image_size, make_noise, sample_image, sample_text

log = logging.getLogger(__name__)

# algorithm.md §10 steps 6–7: the legacy I2T2I constants.
IMAGE_RATIO, TEXT_RATIO = 0.33, 0.67
LOCAL_TOKEN_RANK = 10


def edit_text_latents(latents: torch.Tensor, negative: torch.Tensor | None, positive: torch.Tensor) -> torch.Tensor:
    """``z − (z·n̂)·n̂ + p`` for every row of ``latents`` (algorithm.md §10 step 3).

    Args:
        latents: ``(n, L)`` sampled text latents.
        negative: ``(1, L)`` Optimus latent of the negative prompt, or ``None`` (nothing removed).
        positive: ``(1, L)`` Optimus latent of the positive prompt.
    """
    if negative is not None:
        direction = negative[0] / negative[0].norm()
        latents = latents - (latents @ direction)[:, None] * direction
    return latents + positive


@torch.no_grad()
def edit_image_with_text(
    models,
    image: torch.Tensor,
    positive: str,
    negative: str = "",
    n: int = 2,
    color_adjust: str = "simple",
    width: int | None = None,
    height: int | None = None,
    options: SamplingOptions | None = None,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
) -> ImageFlowResult:
    """Edit ``image`` towards ``positive`` and away from ``negative`` through its description.

    Args:
        models: ``VDModels`` with all four parts (the diffuser's image and text data layers).
        image: ``(1 | n, 3, H, W)`` in [0, 1].
        positive: what the image should show (e.g. "tall castle"); must not be empty.
        negative: what to remove from the description (e.g. "white house"); "" removes nothing.
        n: number of images (and of intermediate sentences).
        color_adjust: ``"simple"`` (match colours to the input) or ``"none"``.
        width, height: output size; default from the image's aspect ratio (longer side 512).
        options: used for both the text and the image sampling; init_latent, denoise: as for
            ``text_to_image`` (image stage only).

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images and their latents.
    """
    options = options or SamplingOptions()
    purpose = "image editing with text (I2T2I)"
    check_images(image)
    check_count(n)
    if image.shape[0] not in (1, n):
        raise VDInputError(f"I2T2I got {image.shape[0]} images for {n} results; give 1 image or {n}")
    if not isinstance(positive, str) or not positive.strip():
        raise VDInputError("I2T2I needs a positive prompt (what the edited image should show)")
    color_adjust = check_color_adjust(color_adjust)
    width, height = resolve_output_size(image, width, height)
    check_image_size(width, height)
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    image_vae = models.require("image_vae", purpose)
    optimus = models.require("optimus", purpose)

    resized = resize_images(image, width, height)
    seen = image_context(clip, resized)
    noise = make_noise(options, n)  # one generator through every stage, as the legacy script
    latents = sample_text(diffuser, [seen], n=n, options=options, noise=noise)
    negative_latent = optimus.encode([negative]).to(latents) if negative.strip() else None
    edited = edit_text_latents(latents, negative_latent, optimus.encode([positive]).to(latents))
    sentences = decode_texts(optimus, edited, noise, clean_up=False)
    log.info("I2T2I edited descriptions: %s", sentences)

    text_cond = torch.cat([clip.encode_text(sentences), clip.encode_text([positive]).expand(n, -1, -1)], dim=1)
    empty = clip.encode_text([""])
    image_cond = low_rank_tokens(seen.cond[:, 1:], LOCAL_TOKEN_RANK)  # global token dropped (algorithm.md §10)
    contexts = [
        GuidedContext("image", image_cond, black_image_context(clip, resized)[:, 1:], ratio=IMAGE_RATIO),
        GuidedContext("text", text_cond, torch.cat([empty, empty], dim=1), ratio=TEXT_RATIO),
    ]
    image_latents = sample_image(
        diffuser, contexts, width=width, height=height, n=n, options=options,
        init_latent=init_latent, denoise=denoise, noise=noise,
    )
    return decode_images(image_vae, image_latents, resized if color_adjust == "simple" else None)
