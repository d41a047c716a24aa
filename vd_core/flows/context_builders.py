"""Building guided contexts from prompts and images (algorithm.md §5, §7.3, §8).

Each builder returns one :class:`GuidedContext` with the unconditional tokens the official WebUI
pairs it with: the empty prompt for text; zeros for images (image variation and the image slots
of dual/multi-context), and, for the text flow only, the CLIP context of a black image (the
official image→text contrast, algorithm.md §11.11).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ..contexts import GuidedContext
from ..errors import VDInputError
from ..focus import apply_focus
from ..validation import check_finite_number, check_image_values

# CLIP context of a black image per encoder: size-independent (every black image preprocesses to
# the same 224×224 zeros), so one forward serves every call.
_BLACK_CONTEXTS: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


def check_images(images: torch.Tensor, what: str = "image") -> None:
    """Raise :class:`VDInputError` unless ``images`` is ``(B, 3, H, W)`` float in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise VDInputError(f"{what} must be a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise VDInputError(f"{what} must be float in [0, 1], got {images.dtype}; divide uint8 images by 255")
    check_image_values(images, what)


def check_mask(mask: torch.Tensor, images: torch.Tensor, what: str = "mask") -> None:
    """Masks are ``(1 | B, 1, H, W)`` in [0, 1] (1 = keep) matching their images' batch and size."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise VDInputError(f"{what} must be (B, 1, H, W) with 1 = keep, got {shape}")
    check_image_values(mask.float(), what)
    if mask.shape[0] not in (1, images.shape[0]):
        raise VDInputError(
            f"{what} has batch {mask.shape[0]} but its image batch is {images.shape[0]}; give one mask, "
            "or one per image"
        )
    if mask.shape[-2:] != images.shape[-2:]:
        raise VDInputError(
            f"{what} is {mask.shape[-1]}×{mask.shape[-2]} but its image is {images.shape[-1]}×{images.shape[-2]}; "
            "resize the mask to the image"
        )


def text_context(clip, prompt: str, negative: str = "") -> GuidedContext:
    """CLIP text context of ``prompt`` with the CLIP context of ``negative`` as unconditional.

    Args:
        clip: ``CLIPContextEncoder``.
        prompt, negative: strings; the official unconditional is the empty prompt (algorithm.md §8).

    Returns:
        ``GuidedContext("text", cond (1, 77, D), uncond (1, 77, D))``.
    """
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise VDInputError(f"prompt and negative prompt must be strings, got {type(prompt).__name__}")
    cond, uncond = clip.encode_text([prompt, negative]).split(1)
    return GuidedContext("text", cond, uncond)


def image_context(
    clip,
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    focus: float = 0.5,
    weight: float = 1.0,
) -> GuidedContext:
    """CLIP image context of ``image`` (optionally masked), focus applied, scaled by ``weight``.

    Args:
        clip: ``CLIPContextEncoder``.
        image: ``(B, 3, H, W)`` in [0, 1]; each batch item gives one context row.
        mask: optional ``(1 | B, 1, H, W)`` in [0, 1], 1 = keep (algorithm.md §5.3).
        focus: 0 (semantic) … 0.5 (unchanged) … 1 (style), on the 256 local tokens (algorithm.md §8.1).
        weight: multiplies the conditional tokens (the Multi-Context slot weight, algorithm.md §8).

    Returns:
        ``GuidedContext("image", cond (B, 257, D), uncond zeros, text_flow_uncond = CLIP(black))``.
    """
    check_images(image)
    if mask is not None:
        check_mask(mask, image)
        mask = mask.expand(image.shape[0], -1, -1, -1)
    check_finite_number(focus, "focus", "0.5 leaves the image as is")
    if not 0.0 <= focus <= 1.0:
        raise VDInputError(f"focus must be between 0 (semantic) and 1 (style), got {focus}; 0.5 leaves the image as is")
    if check_finite_number(weight, "image weight", "1 is the default") < 0:
        raise VDInputError(f"image weight must be ≥ 0, got {weight}")
    cond = apply_focus(clip.encode_image(image, masks=mask), focus) * weight
    return GuidedContext("image", cond, torch.zeros_like(cond[:1]), text_flow_uncond=black_image_context(clip, image))


def black_image_context(clip, like: torch.Tensor) -> torch.Tensor:
    """``(1, 257, D)`` CLIP context of an all-black image shaped like ``like`` (any size gives the
    same): the image→text unconditional (algorithm.md §8), computed once per encoder, device and dtype."""
    cached = _BLACK_CONTEXTS.get(clip)
    if cached is None or (cached.device, cached.dtype) != (clip.device, clip.dtype):
        cached = clip.encode_image(torch.zeros_like(like[:1]))
        _BLACK_CONTEXTS[clip] = cached
    return cached


def mix_contexts(groups: Sequence[Sequence[GuidedContext]], strengths: Sequence[float]) -> tuple[GuidedContext, ...]:
    """Concatenate context groups, scaling each group's ratios to sum to its strength.

    The diffuser normalises all ratios to sum 1 (algorithm.md §4.3), so strengths (0.3, 0.7) and (3, 7)
    mix alike. A group of strength 0 is left out: it would add 0·Δ.

    Args:
        groups: context tuples (e.g. one from a prompt, one from an image).
        strengths: one value ≥ 0 per group, not all 0.

    Returns:
        The contexts of every group with strength > 0, ratios rescaled.
    """
    if len(groups) != len(strengths):
        raise VDInputError(f"{len(groups)} context groups but {len(strengths)} strengths; give one strength per group")
    for i, strength in enumerate(strengths):
        check_finite_number(strength, f"strength {i + 1} of the context mix", "use a value in 0 … 1")
    if any(s < 0 for s in strengths) or not any(s > 0 for s in strengths):
        raise VDInputError(f"strengths must be ≥ 0 and not all 0, got {list(strengths)}")
    mixed = []
    for group, strength in zip(groups, strengths):
        if strength == 0:
            continue
        if not group:
            raise VDInputError("an empty context group was given a strength above 0")
        total = sum(c.ratio for c in group)
        if total <= 0:
            raise VDInputError("a context group has only zero ratios; give it a positive ratio")
        mixed.extend(c.with_ratio(c.ratio / total * strength) for c in group)
    return tuple(mixed)
