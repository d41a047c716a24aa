"""Will an image run fit? A simple, explainable estimate made before anything is allocated, so a
65536×65536 output or a batch of 10000 is refused with what fits instead of exhausting the machine.

The estimate counts only the activations that must exist at once, per latent pixel
(``h·w = H/8·W/8``):

* **sampling**: the diffuser runs the guided batch (2 rows per image with guidance) at the finest
  level with ``ACTIVATION_WIDTHS × model_channels`` values alive per latent pixel (the
  skips kept for the way up, the attention and feed-forward buffers);
* **decoding**: the image VAE decodes ``decode_batch`` images at a time at full resolution with
  ``VAE_ACTIVATION_WIDTHS × vae_channels`` values alive per *pixel* (:func:`decode_batch_size`
  picks the largest batch that fits, so decoding never decides whether a run fits);
* **results**: the decoded images in float32 (3 values per pixel and image).

It is a lower bound of the real peak (weights are not counted: they are already loaded and
so no longer free), so a refused run could not have run.
"""

from __future__ import annotations

import os

import torch

from .errors import VDInputError

ACTIVATION_WIDTHS = 16  # values per latent pixel and batch row, in units of model_channels
VAE_ACTIVATION_WIDTHS = 3  # values per pixel and image, in units of the VAE's finest width
MAX_SIDE = 16384  # ComfyUI's MAX_RESOLUTION: larger sides are refused whatever the memory


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` now (CUDA: the driver's free bytes; CPU: MemAvailable), or None
    when it cannot be known (then nothing is refused on memory grounds)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def sampling_bytes(n: int, width: int, height: int, *, model_channels: int, itemsize: int, guided: bool = True) -> int:
    """Bytes of diffuser activations alive at once for ``n`` images of ``width``×``height`` px."""
    rows = 2 * n if guided else n
    return rows * (width // 8) * (height // 8) * ACTIVATION_WIDTHS * model_channels * itemsize


def decode_bytes(images: int, width: int, height: int, *, vae_channels: int, itemsize: int) -> int:
    """Bytes the image VAE's full-resolution activations need to decode ``images`` at once."""
    return images * width * height * VAE_ACTIVATION_WIDTHS * vae_channels * itemsize


def result_bytes(n: int, width: int, height: int) -> int:
    """Bytes of ``n`` decoded float32 RGB images."""
    return n * 3 * width * height * 4


def decode_batch_size(n: int, width: int, height: int, *, vae_channels: int, itemsize: int,
                      device: torch.device | str) -> int:
    """How many images to decode at once (1 … n): as many as fit in half the free memory."""
    free = available_bytes(device)
    if free is None:
        return n
    one = max(1, decode_bytes(1, width, height, vae_channels=vae_channels, itemsize=itemsize))
    return max(1, min(n, free // 2 // one))


def check_image_run_fits(n: int, width: int, height: int, *, device: torch.device | str, dtype: torch.dtype,
                         model_channels: int, vae_channels: int = 128, guided: bool = True,
                         free: int | None = None) -> None:
    """Raise :class:`VDInputError` when ``n`` images of ``width``×``height`` cannot fit, saying what fits.

    Args:
        model_channels: the diffuser's ``config.model_channels`` (320 full size).
        vae_channels: the image VAE's finest width (``config.ch``, 128 full size).
        free: free bytes (default: :func:`available_bytes` of ``device``).
    """
    for name, side in (("width", width), ("height", height)):
        if side > MAX_SIDE:
            raise VDInputError(f"{name} {side} px is larger than {MAX_SIDE} px (ComfyUI's limit); VD was trained at 512")
    free = available_bytes(device) if free is None else free
    if free is None:
        return
    itemsize = torch.empty((), dtype=dtype).element_size()

    def need(count: int, w: int = width, h: int = height) -> int:
        return max(
            sampling_bytes(count, w, h, model_channels=model_channels, itemsize=itemsize, guided=guided),
            decode_bytes(1, w, h, vae_channels=vae_channels, itemsize=4),
        ) + result_bytes(count, w, h)

    if need(n) <= free:
        return
    gib = 2**30
    fits = _largest(lambda count: need(count) <= free, n)
    if fits:
        advice = f"at {width}×{height} at most {fits} image(s) fit per run: ask for {fits} or fewer"
    else:
        side = _largest(lambda s: need(1, 8 * s, 8 * s) <= free, max(width, height) // 8) * 8
        advice = f"even one image of {width}×{height} does not fit; the largest square that fits is about {side}×{side}"
    raise VDInputError(
        f"{n} image(s) of {width}×{height} px need at least {need(n) / gib:.1f} GiB of {torch.device(device)} memory "
        f"while sampling and decoding, and {free / gib:.1f} GiB is free; {advice}"
    )


def _largest(fits, upper: int) -> int:
    """The largest k in 0 … upper with ``fits(k)`` (fits is monotone decreasing in k)."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
