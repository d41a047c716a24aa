"""The WebUI's "Simple" colour adjustment of image-variation outputs (algorithm.md §8.2)."""

from __future__ import annotations

import torch

from .errors import VDInputError


def match_color_simple(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give every image the per-channel mean and std of the reference, then clamp to [0, 1].

    ``out = (y − mean(y)) / std(y) · std(ref) + mean(ref)`` per image and channel, means and
    **unbiased** stds over all pixels of the channel (algorithm.md §8.2).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1], e.g. decoded samples.
        reference: ``(1, 3, H', W')`` shared by all images, or ``(B, 3, H', W')`` one per image, in
            [0, 1]. Only its channel statistics are used, so its size may differ from the images'
            (the WebUI's reference is the input resized to the output size; a differently sized
            reference gives the same result up to resampling).

    Returns:
        ``(B, 3, H, W)`` in [0, 1], float32 computation, in the images' dtype. A channel of constant
        value (std 0) becomes the reference mean instead of NaN.

    Raises:
        VDInputError: shapes that are not images, channel counts that differ, or a reference batch
            that is neither 1 nor B.
    """
    if images.ndim != 4 or reference.ndim != 4 or images.shape[1] != reference.shape[1]:
        raise VDInputError(
            f"colour match: images {tuple(images.shape)} and reference {tuple(reference.shape)} must both be "
            "(B, C, H, W) with the same number of channels."
        )
    if reference.shape[0] not in (1, images.shape[0]):
        raise VDInputError(
            f"colour match: the reference batch must be 1 or equal to the image batch ({images.shape[0]}), "
            f"got {reference.shape[0]}."
        )
    y_mean, y_std = _channel_stats(images.float())
    ref_mean, ref_std = _channel_stats(reference.to(device=images.device, dtype=torch.float32))
    out = (images.float() - y_mean) / y_std.clamp_min(torch.finfo(torch.float32).tiny) * ref_std + ref_mean
    return out.clamp(0, 1).to(images.dtype)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of each channel of ``x`` (B, C, H, W) over its pixels, each (B, C, 1, 1)."""
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], flat.std(-1)[..., None, None]
