"""Data layers of the image diffuser (algorithm.md §3.1–3.2): the UNet res block and the resolution changes.

Module and child names reproduce the official state-dict keys (``in_layers.2``, ``out_layers.3``,
``op``, ``conv`` …); ``nn.Identity`` stands where the official code has a parameterless
``Dropout(0)``, so that the indices after it stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import NORM_GROUPS


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the release's 32 groups (never upcast: algorithm.md §9)."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=eps)


class ResBlock(nn.Module):
    """``skip(x) + out_layers(in_layers(x) + emb_layers(emb))`` (algorithm.md §3.1).

    ``kernel_size`` 3 for the image diffuser; the text diffuser reuses the block with 1×1
    convolutions on its flattened activations (algorithm.md §3.4).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, kernel_size: int = 3):
        super().__init__()
        padding = kernel_size // 2
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding),
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), emb (B, time_embed_dim) -> (B, C_out, H, W)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Conv 3×3, stride 2, padding 1: (B, C, H, W) -> (B, C, ⌈H/2⌉, ⌈W/2⌉)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling then Conv 3×3: (B, C, H, W) -> (B, C, *size), default size (2H, 2W).

    The walk passes the size of the skip activation it concatenates next, so that latents whose
    sides are not multiples of 8 (a ⌈h/2⌉ downsampling on the way down) fit on the way up, as in
    ComfyUI's UNet. For size (2H, 2W) nearest-to-size picks the same pixels as the official ×2.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def image_input_layer(in_channels: int, model_channels: int) -> nn.Conv2d:
    """Conv 3×3: latent (B, 4, h, w) -> (B, model_channels, h, w) (algorithm.md §4.2 d00)."""
    return nn.Conv2d(in_channels, model_channels, 3, padding=1)


def image_output_layer(model_channels: int, out_channels: int) -> nn.Sequential:
    """GroupNorm → SiLU → Conv 3×3: (B, model_channels, h, w) -> ε (B, 4, h, w) (algorithm.md §4.2 d29)."""
    return nn.Sequential(group_norm(model_channels), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
