"""Image files ↔ tensors: every PIL mode read at its real bit depth, or refused; every written file
in the format its extension names.

Reading: 8-bit modes (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``,
``LAB``, ``HSV`` …) go through PIL's own conversion (transparency is dropped, not composited);
16-bit modes (``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding 0…65535, as PIL opens 16-bit PNGs
and TIFFs) are divided by 65535 — converting them to 8 bits in PIL saturates them to white;
32-bit float ``F`` images are taken as they are when in [0, 1]. Anything else is refused with the
mode named. JPEG orientation tags are applied.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import VDInputError

# Output formats by extension (what Pillow writes for them).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format a path's extension names (``PNG``, ``JPEG``, ``WEBP``).

    Raises:
        VDInputError: any other extension (the file would hold bytes its name does not say).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise VDInputError(
            f"output {path}: unknown image extension {suffix or '(none)'!r}; use one of {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def read_image_file(path: str | os.PathLike) -> torch.Tensor:
    """An image file → ``(1, 3, H, W)`` float32 in [0, 1] (RGB; grey replicated; alpha dropped)."""
    return _read(Path(path), "image", channels=3)


def read_mask_file(path: str | os.PathLike) -> torch.Tensor:
    """A mask file → ``(1, 1, H, W)`` float32 in [0, 1], white = keep (colour files: their luminance)."""
    return _read(Path(path), "mask", channels=1)


def pil_to_tensor(image: Image.Image, channels: int, what: str = "image") -> torch.Tensor:
    """A PIL image of any mode → ``(channels, H, W)`` float32 in [0, 1] (channels 3 = RGB, 1 = grey)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise VDInputError(
                f"{what} is a 32-bit integer image with values {values.min():g} … {values.max():g}; only 16-bit "
                "data (0 … 65535) can be read: save it as an 8- or 16-bit PNG"
            )
        return _grey(values / 65535, channels)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise VDInputError(
                f"{what} is a 32-bit float image with values outside [0, 1] (or NaN); save it as an 8- or "
                "16-bit PNG, or scale it to [0, 1]"
            )
        return _grey(values, channels)
    try:
        converted = image.convert("RGB" if channels == 3 else "L")
    except (ValueError, OSError) as exc:
        raise VDInputError(f"{what}: images of PIL mode {mode!r} cannot be read ({exc}); save it as an RGB PNG") from None
    pixels = np.atleast_3d(np.asarray(converted)).astype(np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def write_image_file(image: torch.Tensor, path: str | os.PathLike, file_format: str | None = None) -> None:
    """Write one ``(3, H, W)`` image in [0, 1] as 8-bit RGB in ``file_format`` (default: the
    format ``path``'s extension names, :func:`image_format`)."""
    file_format = file_format or image_format(path)
    u8 = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    options = {"quality": 95} if file_format in ("JPEG", "WEBP") else {}
    Image.fromarray(u8, "RGB").save(path, format=file_format, **options)


def _read(path: Path, what: str, channels: int) -> torch.Tensor:
    if path.is_dir():
        raise VDInputError(f"{what} {path} is a folder; give an image file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            pixels = pil_to_tensor(image, channels, f"{what} {path}")
    except FileNotFoundError:
        raise VDInputError(f"cannot read {what} {path}: not found") from None
    except PermissionError:
        raise VDInputError(f"cannot read {what} {path}: permission denied") from None
    except UnidentifiedImageError:
        raise VDInputError(f"{what} {path} is not an image file Pillow can read (PNG, JPEG, WebP, TIFF …)") from None
    except (OSError, ValueError) as exc:
        raise VDInputError(f"cannot read {what} {path}: {exc}") from exc
    return pixels[None]


def _grey(values: np.ndarray, channels: int) -> torch.Tensor:
    plane = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None]
    return plane.expand(channels, -1, -1).clone()
