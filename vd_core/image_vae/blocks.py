"""Building blocks of the kl-f8 image autoencoder (LDM ``AutoencoderKL``; algorithm.md §6.1).

Module and attribute names follow the LDM state-dict layout (``encoder.down.{i}.block.{j}.conv1``,
``decoder.up.{i}.upsample.conv``, ``mid.attn_1.q`` …) so released ``kl-f8.pth`` files load
strictly without any key renaming. Every width and depth is a constructor argument; the caller
(:mod:`vd_core.image_vae`) derives them from tensor shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# algorithm.md §6.1: every normalisation of the VAE is GroupNorm with 32 groups and eps 1e-6
# (the diffuser's ResBlocks use eps 1e-5; the VAE differs).
GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


def vae_group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine) over ``channels``."""
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv3×3 → norm → swish → conv3×3, plus a (1×1 when widths differ) skip.

    (B, C_in, H, W) → (B, C_out, H, W). No time embedding: the VAE's blocks are unconditional.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = vae_group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # LDM names the 1×1 projection of the skip path ``nin_shortcut`` ("network in network").
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1-conv projections and a residual.

    (B, C, H, W) → (B, C, H, W); the H·W positions attend to each other with scale C^-0.5.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = vae_group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) → (B, 1, H·W, C): one head whose width is the full channel count.
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3×3 after zero padding of one pixel on the right and bottom only.

    (B, C, H, W) → (B, C, H/2, W/2). The asymmetric (0, 1, 0, 1) padding is what the LDM
    weights were trained with (algorithm.md §6.1); symmetric padding 1 would shift the result.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then conv3×3: (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock → AttnBlock → ResnetBlock at the coarsest resolution, C channels throughout."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class ResolutionLevel(nn.Module):
    """The ResnetBlocks (``block.*``) of one resolution, each followed by an AttnBlock (``attn.*``)
    when the level has attention (kl-f8 has none outside the middle block).

    (B, C_in, H, W) → (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks)) if with_attn else nn.ModuleList()

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
        return x


class EncoderLevel(ResolutionLevel):
    """A :class:`ResolutionLevel` followed by an optional ``downsample`` (all but the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, downsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(ResolutionLevel):
    """A :class:`ResolutionLevel` followed by an optional ``upsample`` (all but ``up[0]``)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, upsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, with_attn)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] → moments (B, 2·z_channels, H/f, W/f), f = 2^(levels−1).

    Level i has ``num_res_blocks`` ResnetBlocks of width ``ch·ch_mult[i]``; every level but the
    last ends with a Downsample.
    """

    def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[int], z_channels: int):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(ch if i == 0 else widths[i - 1], widths[i], num_res_blocks, i in attn_levels, i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = vae_group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_channels, h·f, w·f) in about [-1, 1] (unclamped).

    Levels run from the coarsest (``up[-1]``) to the finest (``up[0]``); each has
    ``num_res_blocks + 1`` ResnetBlocks, and every level but ``up[0]`` ends with an Upsample.
    """

    def __init__(self, *, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[int], z_channels: int):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # up[i] is built from the width of the level below it in execution order (up[i+1]).
        self.up = nn.ModuleList(
            DecoderLevel(widths[i + 1] if i + 1 < len(widths) else widths[-1], widths[i], num_res_blocks + 1,
                         i in attn_levels, i != 0)
            for i in range(len(widths))
        )
        self.norm_out = vae_group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
