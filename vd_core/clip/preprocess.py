"""The official CLIP preprocessing of VD's image context encoder (algorithm.md §5.2, §5.3).

Images become CLIP pixels exactly as the official code makes them: torchvision's ``ToPILImage``
truncation to uint8, the CLIP processor's PIL bicubic resize of the shorter side, centre crop and
mean/std normalisation. Masks become one weight per vision token (class token + patches).

Input conventions (``docs/ARCHITECTURE.md``): images ``(B, 3, H, W)`` float in ``[0, 1]``, masks
``(B, 1, H, W)`` float in ``[0, 1]`` with 1 = keep.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, VDInputError
from ..validation import check_image_values

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPImagePreprocessing:
    """Settings of the CLIP image processor (``preprocessor_config.json``).

    Attributes:
        shortest_edge: the shorter image side is resized to this many pixels (224 for ViT-L/14).
        crop_size: side of the centre crop, equal to the vision tower's image size.
        mean, std: per-channel normalisation of the ``[0, 1]`` pixels.
        rescale_factor: uint8 → ``[0, 1]`` factor (1/255).
        resample: PIL resampling filter of the resize (3 = bicubic).
    """

    shortest_edge: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self):
        if not 0 < self.crop_size <= self.shortest_edge:
            raise ValueError(f"crop size {self.crop_size} must be positive and at most the resize size {self.shortest_edge}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} and std {self.std} must have 3 values, std positive")

    @classmethod
    def openai(cls, image_size: int = 224) -> "CLIPImagePreprocessing":
        """OpenAI CLIP's values for a vision tower of ``image_size`` pixels (used without a config file)."""
        return cls(shortest_edge=image_size, crop_size=image_size)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "CLIPImagePreprocessing":
        """Read a Hugging Face ``preprocessor_config.json``.

        Both layouts are understood: the 2022 one (``"size": 224``, ``"crop_size": 224``) and the
        current one (``"size": {"shortest_edge": 224}``, ``"crop_size": {"height": 224, "width": 224}``).

        Raises:
            CheckpointError: the file is unreadable or asks for something other than a shortest-edge
                resize followed by a square centre crop.
        """
        path = Path(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                shortest_edge=_side(config.get("size", 224), "shortest_edge"),
                crop_size=_side(config.get("crop_size", 224), "height", "width"),
                mean=tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN)),
                std=tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD)),
                rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(
                f"CLIP preprocessor config {path} could not be used ({exc}); it must ask for a resize of "
                "the shortest edge and a square centre crop, like openai/clip-vit-large-patch14's. Delete "
                "the file to use OpenAI CLIP's default preprocessing."
            ) from exc


def _side(value, *keys: str) -> int:
    """One side length from an int or a ``{"shortest_edge": n}`` / ``{"height": n, "width": n}`` dict."""
    if isinstance(value, int):
        return value
    sides = {int(value[k]) for k in keys}
    if len(sides) != 1:
        raise ValueError(f"non-square size {value}")
    return sides.pop()


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate images and bring them to ``(B, 3, H, W)``.

    Accepted: float ``(B, C, H, W)`` or ``(C, H, W)`` (a batch dimension is added) in ``[0, 1]`` with
    C = 3 (RGB), 4 (RGBA: the alpha channel is dropped, as PIL's ``convert("RGB")`` does — it is
    not composited over a background) or 1 (greyscale: replicated to RGB).

    Raises:
        VDInputError: not a float tensor (uint8 images must be divided by 255 first), wrong number
            of dimensions or channels (channels-last images must be permuted), empty, or values
            outside ``[0, 1]`` or not finite.
    """
    if not isinstance(images, torch.Tensor):
        raise VDInputError(f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise VDInputError(
            f"images must be a float tensor in [0, 1], got dtype {images.dtype}; divide uint8 images by "
            "255 (images.float() / 255)"
        )
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise VDInputError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    if channels not in (1, 3, 4):
        hint = (
            "; it looks channels-last (B, H, W, C) like a ComfyUI IMAGE: use images.permute(0, 3, 1, 2)"
            if images.shape[-1] in (1, 3, 4) else ""
        )
        raise VDInputError(f"images must have 1, 3 or 4 channels in dim 1, got shape {tuple(images.shape)}{hint}")
    if images.numel() == 0:
        raise VDInputError(f"images are empty: shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise VDInputError("images contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise VDInputError(
            f"image values must be in [0, 1], got [{low:.4g}, {high:.4g}]; map [-1, 1] images with "
            "(x + 1) / 2 and divide 0…255 images by 255"
        )
    if channels == 4:
        images = images[:, :3]
    elif channels == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``trunc(x · 255)`` as uint8, computed in the images' dtype (algorithm.md §5.2 step 1: torchvision's
    ``ToPILImage`` truncates, it does not round). ``(B, 3, H, W)`` in ``[0, 1]`` → uint8 on the CPU."""
    return (images.detach() * 255).to(device="cpu", dtype=torch.uint8)


def resize_and_crop(images_u8: torch.Tensor, settings: CLIPImagePreprocessing) -> torch.Tensor:
    """PIL resize of the shorter side to ``settings.shortest_edge`` and a centre crop (algorithm.md §5.2 step 2).

    ``(B, 3, H, W)`` uint8 → ``(B, 3, S, S)`` uint8 with S = ``settings.crop_size``. Images run one by
    one through PIL, so the result is bit-identical to the official processor's.
    """
    size, crop = settings.shortest_edge, settings.crop_size
    height, width = images_u8.shape[-2:]
    short, long = min(height, width), max(height, width)
    if short == size:
        new_height, new_width = height, width
    else:
        new_long = int(size * long / short)  # the processor truncates, in this order of operations
        new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    top, left = (new_height - crop) // 2, (new_width - crop) // 2
    out = torch.empty((images_u8.shape[0], 3, crop, crop), dtype=torch.uint8)
    for i, image in enumerate(images_u8):
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        if (new_height, new_width) != (height, width):
            pil = Image.fromarray(pixels).resize((new_width, new_height), resample=settings.resample)
            pixels = np.asarray(pil)
        out[i] = torch.from_numpy(pixels[top:top + crop, left:left + crop].copy()).permute(2, 0, 1)
    return out


def normalise(images_u8: torch.Tensor, settings: CLIPImagePreprocessing) -> torch.Tensor:
    """``(u8 · rescale_factor − mean) / std`` in float32: ``(B, 3, S, S)`` uint8 → CLIP pixel values."""
    mean = torch.tensor(settings.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() * settings.rescale_factor - mean) / std


def preprocess_images(images: torch.Tensor, settings: CLIPImagePreprocessing) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` (as :func:`check_images` returns them) → float32 CLIP
    pixels ``(B, 3, S, S)`` on the CPU: truncation to uint8, PIL resize and crop, normalisation."""
    return normalise(resize_and_crop(to_uint8(images), settings), settings)


def check_masks(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """Validate masks for ``batch`` images and bring them to float32 ``(batch, 1, H, W)`` in ``[0, 1]``.

    Accepted: ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)``, float or bool, 1 = keep. Values are clamped
    to ``[0, 1]`` as the official encoder does. A mask batch of 1 is used for every image. The mask
    may have another size than its image: it is resized to the vision input size directly from its
    own resolution (algorithm.md §5.3 step 1), so it only lines up with square images.

    Raises:
        VDInputError: not a tensor of that shape, an integer dtype, NaN values, or a batch that is
            neither 1 nor ``batch``.
    """
    if not isinstance(masks, torch.Tensor):
        raise VDInputError(f"masks must be a torch.Tensor (B, 1, H, W) in [0, 1], got {type(masks).__name__}")
    if not (masks.is_floating_point() or masks.dtype == torch.bool):
        raise VDInputError(f"masks must be float in [0, 1] (1 = keep) or bool, got dtype {masks.dtype}")
    if masks.dim() == 2:
        masks = masks[None, None]
    elif masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] != 1 or masks.numel() == 0:
        raise VDInputError(f"masks must have shape (B, 1, H, W), (B, H, W) or (H, W), got {tuple(masks.shape)}")
    if masks.shape[0] not in (1, batch):
        raise VDInputError(f"{masks.shape[0]} masks for {batch} images: give one mask, or one per image")
    masks = masks.float()
    check_image_values(masks, "masks")  # NaN, inf and 0…255 masks are refused before the clamp
    return masks.clamp(0, 1).expand(batch, -1, -1, -1)


def mask_token_weights(masks: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor | None:
    """One weight per vision token from masks (algorithm.md §5.3 steps 1–3).

    Args:
        masks: ``(B, 1, H, W)`` float32 in ``[0, 1]``, 1 = keep (see :func:`check_masks`).
        image_size: the vision tower's input size (224).
        patch_size: its patch size (14).

    Returns:
        ``(B, 1 + (image_size/patch_size)², 1)`` float32: the mean of the resized mask for the class
        token, then each patch's mean, row-major; ``None`` when every value is 1 (the official code
        then takes the unmasked path).
    """
    resized = F.interpolate(masks.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    # The official check is on the whole batch after resizing (sum == numel).
    if bool((resized == 1).all()):
        return None
    global_weight = resized.mean(dim=(1, 2, 3)).view(-1, 1, 1)
    patch_weights = F.avg_pool2d(resized, kernel_size=patch_size, stride=patch_size).flatten(2).transpose(1, 2)
    return torch.cat([global_weight, patch_weights], dim=1)
