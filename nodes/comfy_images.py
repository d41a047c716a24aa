"""Layout changes between ComfyUI's IMAGE/MASK tensors and vd_core's conventions.

ComfyUI: IMAGE ``(B, H, W, C)`` float in [0, 1]; MASK ``(B, H, W)`` or ``(H, W)``, **1 = masked**.
vd_core (docs/ARCHITECTURE.md): images ``(B, 3, H, W)`` in [0, 1]; masks ``(B, 1, H, W)``,
**1 = keep** (algorithm.md §5.3, §8: VD keeps what the mask is 1 on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vd_core.errors import VDInputError
from .types import STORAGE_DEVICE


def to_vd_images(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, C≥3)`` → ``(B, 3, H, W)`` float32 (an alpha channel is dropped)."""
    if image.dim() != 4 or image.shape[-1] < 3:
        raise VDInputError(
            f"expected a ComfyUI IMAGE of shape (batch, height, width, 3), got {tuple(image.shape)}; "
            "connect an IMAGE output such as Load Image's"
        )
    return image[..., :3].permute(0, 3, 1, 2).float().contiguous()


def to_comfy_images(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` → ComfyUI IMAGE ``(B, H, W, 3)`` float32 on the CPU."""
    return images.permute(0, 2, 3, 1).to(STORAGE_DEVICE, torch.float32).contiguous()


def keep_mask_from_comfy(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """ComfyUI MASK (1 = masked) → VD keep-mask ``(batch, 1, height, width)`` (1 = keep).

    A mask of another size is resized to the image's size (bilinear), as a mask drawn on a
    differently sized copy of the image is meant to cover the same regions. A single mask serves
    every image of the batch.

    Raises:
        VDInputError: the mask is not 2-D/3-D, or its batch is neither 1 nor ``batch``.
    """
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise VDInputError(f"expected a ComfyUI MASK of shape (batch, height, width), got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise VDInputError(
            f"the mask batch ({mask.shape[0]}) does not match the image batch ({batch}); "
            "give one mask for all images or one mask per image"
        )
    keep = 1.0 - mask.float().clamp(0.0, 1.0)[:, None]
    if keep.shape[-2:] != (height, width):
        keep = F.interpolate(keep, size=(height, width), mode="bilinear", align_corners=False)
    return keep.expand(batch, -1, -1, -1).contiguous()


class PlainVAE:
    """Outside ComfyUI: core VAE's API (``decode``/``encode`` on channels-last images) on vd_core's VAE."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) → IMAGE (B, 8h, 8w, 3) float32 in [0, 1]."""
        return to_comfy_images(self.vae.decode(latent))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE (B, H, W, 3+) in [0, 1] → unscaled latents (B, 4, H/8, W/8) (posterior mean);
        like ComfyUI, extra channels are dropped and sizes are centre-cropped to multiples of 8."""
        h, w = image.shape[1] // 8 * 8, image.shape[2] // 8 * 8
        top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
        return self.vae.encode(to_vd_images(image[:, top : top + h, left : left + w])).float()
