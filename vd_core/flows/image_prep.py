"""Preparing input images and masks at the output size, as the official WebUI does (algorithm.md §8).

The WebUI resizes every input image with PIL bicubic and every sketch mask with PIL bilinear to
the output size before CLIP, the VAE and the colour reference see them. It squashes everything to
512×512 (algorithm.md §11.12); here the output size keeps the input's aspect ratio by default.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..validation import check_image_values

# VD was trained at 512×512: the default output puts the longer side there (algorithm.md §8).
DEFAULT_LONG_SIDE = 512


def default_output_size(image: torch.Tensor, long_side: int = DEFAULT_LONG_SIDE) -> tuple[int, int]:
    """``(width, height)`` with the image's aspect ratio, the longer side ``long_side``, both
    rounded to multiples of 8 (at least 8). A square image gives the WebUI's 512×512.

    Args:
        image: ``(B, 3, H, W)``.
    """
    height, width = image.shape[-2:]
    scale = long_side / max(width, height)
    return max(8, 8 * round(width * scale / 8)), max(8, 8 * round(height * scale / 8))


def resolve_output_size(image: torch.Tensor, width: int | None, height: int | None) -> tuple[int, int]:
    """The requested ``(width, height)``; a missing side follows the image's aspect ratio, and
    both missing give :func:`default_output_size`. Validity (multiples of 8) is checked by the
    sampler."""
    if width is None and height is None:
        return default_output_size(image)
    in_height, in_width = image.shape[-2:]
    if width is None:
        width = max(8, 8 * round(height * in_width / in_height / 8))
    if height is None:
        height = max(8, 8 * round(width * in_height / in_width / 8))
    return width, height


def resize_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``(B, 3, H, W)`` images in [0, 1] with PIL bicubic, through 8-bit RGB like the WebUI.

    Images already at ``width``×``height`` are returned unchanged (no 8-bit rounding). NaN and
    values far outside [0, 1] are refused first (the 8-bit conversion would clamp them away).
    """
    check_image_values(images, "image to resize")
    if images.shape[-2:] == (height, width):
        return images
    out = []
    for image in images:
        u8 = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        resized = Image.fromarray(u8, "RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    return torch.stack(out).to(device=images.device, dtype=images.dtype) / 255


def resize_masks(masks: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize ``(B, 1, H, W)`` masks in [0, 1] with PIL bilinear (in float, no 8-bit rounding);
    NaN and values far outside [0, 1] are refused first (the result is clamped)."""
    check_image_values(masks, "mask to resize")
    if masks.shape[-2:] == (height, width):
        return masks
    out = []
    for mask in masks:
        plane = Image.fromarray(mask[0].detach().float().cpu().numpy(), "F")
        resized = plane.resize((width, height), resample=Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(resized).copy())[None])
    return torch.stack(out).to(device=masks.device, dtype=masks.dtype).clamp(0, 1)
