"""Multi context (algorithm.md §8 "Multi-Context" / "Triple-Context"): a prompt and any number of images,
each optionally masked, weighted and focused.

Every image slot gives a (masked) CLIP image context with focus on its local tokens, multiplied by
its weight; the slots are concatenated along the token axis into ONE image context (257·k tokens,
unconditional zeros) of ratio 1 − τ; the prompt, when given with τ > 0, is a text context of ratio
τ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..contexts import GuidedContext
from ..errors import VDInputError
from ..validation import check_finite_number
from .context_builders import check_images, check_mask, image_context, mix_contexts, text_context
from .image_prep import resize_images, resize_masks, resolve_output_size
from .options import SamplingOptions
from .result import ImageFlowResult, decode_images
from .sampling import check_count, check_image_size, sample_image


def check_text_strength(text_strength: float) -> None:
    check_finite_number(text_strength, "text strength", "0 = images only, 1 = text only")
    if not 0.0 <= text_strength <= 1.0:
        raise VDInputError(f"text strength must be between 0 (image only) and 1 (text only), got {text_strength}")


class ImageSlot(NamedTuple):
    """One image of a multi-context run.

    Attributes:
        image: ``(1 | n, 3, H, W)`` in [0, 1].
        mask: optional ``(1 | B, 1, H, W)`` in [0, 1], 1 = keep (the WebUI's sketch, inverted).
        weight: multiplies this slot's tokens (the WebUI's "Weight", 0…1, default 1).
        focus: semantic ↔ style focus of this slot (algorithm.md §8.1).
    """

    image: torch.Tensor
    mask: torch.Tensor | None = None
    weight: float = 1.0
    focus: float = 0.5


@torch.no_grad()
def multi_context(
    models,
    prompt: str,
    slots: Sequence[ImageSlot],
    text_strength: float = 0.0,
    negative: str = "",
    n: int = 2,
    width: int | None = None,
    height: int | None = None,
    options: SamplingOptions | None = None,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
) -> ImageFlowResult:
    """Generate ``n`` images guided by several images and an optional prompt.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and the image VAE.
        prompt: the text context (may be empty); negative: its unconditional prompt.
        slots: at least one :class:`ImageSlot`. Each image and mask is resized to the output size
            (PIL bicubic / bilinear) like the WebUI before CLIP sees it.
        text_strength: τ ∈ [0, 1], the prompt's share against the images' 1 − τ.
        width, height: output size; default from the first image's aspect ratio (longer side 512).
        options, init_latent, denoise: as for ``text_to_image``.

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images and their latents.
    """
    options = options or SamplingOptions()
    purpose = "multi-context generation"
    if not slots:
        raise VDInputError("multi-context needs at least one image slot; give an image (or use text_to_image)")
    check_count(n)
    check_text_strength(text_strength)
    for i, slot in enumerate(slots):
        check_images(slot.image, f"image {i + 1}")
        if slot.image.shape[0] not in (1, n):
            raise VDInputError(f"image {i + 1} has batch {slot.image.shape[0]} for {n} results; give 1 image or {n}")
        if slot.mask is not None:
            check_mask(slot.mask, slot.image, f"mask of image {i + 1}")
    width, height = resolve_output_size(slots[0].image, width, height)
    check_image_size(width, height)
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    image_vae = models.require("image_vae", purpose)

    images = []
    for slot in slots:
        mask = None if slot.mask is None else resize_masks(slot.mask, width, height)
        images.append(image_context(clip, resize_images(slot.image, width, height), mask, slot.focus, slot.weight))
    text = (text_context(clip, prompt, negative),) if prompt and text_strength > 0 else None
    contexts = join_image_contexts(images, text, text_strength)
    latents = sample_image(
        diffuser, contexts, width=width, height=height, n=n, options=options, init_latent=init_latent, denoise=denoise
    )
    return decode_images(image_vae, latents)


def join_image_contexts(
    images: Sequence[GuidedContext], text: Sequence[GuidedContext] | None, text_strength: float
) -> tuple[GuidedContext, ...]:
    """The WebUI's Multi-Context conditioning (algorithm.md §8): the image contexts' tokens concatenated into
    ONE image context (257·k tokens (B, 257·k, D), unconditional zeros) of ratio 1 − τ, plus the text
    context of ratio τ when one is given and τ > 0 (text first: the official order).

    Args:
        images: one or more image contexts, each already masked, focused and weighted.
        text: an optional text context (a ``VD_CONTEXT`` tuple).
        text_strength: τ ∈ [0, 1].

    Raises:
        VDInputError: no image context, a text context among the images, or τ outside [0, 1].
    """
    check_text_strength(text_strength)
    if not images:
        raise VDInputError("multi-context needs at least one image context")
    if any(context.kind != "image" for context in images):
        raise VDInputError("the image slots take image contexts only (VD CLIP Image Context); give the text as the text context")
    batch = max(context.cond.shape[0] for context in images)
    cond = torch.cat([context.cond.expand(batch, -1, -1) for context in images], dim=1)
    image_group = (GuidedContext("image", cond, torch.zeros_like(cond[:1])),)
    if not text or text_strength == 0:
        return image_group
    return tuple(mix_contexts([tuple(text), image_group], [text_strength, 1.0 - text_strength]))
