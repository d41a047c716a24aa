"""Image variation (algorithm.md §8 "Image-Variation"): CLIP-image(image) with focus, against zeros.

The WebUI's detail controls are all here: fidelity (how much of the input latent to keep, algorithm.md
§7.4), focus (semantic ↔ style, algorithm.md §8.1) and the "Simple" colour adjustment (algorithm.md §8.2). Unlike
the WebUI, which squashes every input to 512×512, the output keeps the input's aspect ratio by
default (longer side 512, see ``image_prep.default_output_size``).
"""

from __future__ import annotations

import torch

from ..errors import VDInputError
from .context_builders import check_images, image_context
from .image_prep import resize_images, resolve_output_size
from .options import SamplingOptions
from .result import ImageFlowResult, check_color_adjust, decode_images
from .sampling import check_count, check_image_size, encode_start_latent, make_noise, sample_image


@torch.no_grad()
def image_variation(
    models,
    image: torch.Tensor,
    n: int = 2,
    fidelity: float = 0.0,
    focus: float = 0.5,
    color_adjust: str = "simple",
    width: int | None = None,
    height: int | None = None,
    options: SamplingOptions | None = None,
    init_latent: torch.Tensor | None = None,
) -> ImageFlowResult:
    """Generate ``n`` variations of ``image``.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and the image VAE.
        image: ``(1 | n, 3, H, W)`` in [0, 1]; with ``n`` images, result i varies image i.
        n: number of images.
        fidelity: 0 (sample from noise, the default) … 1 (return the input). In between, the
            official path: a VAE posterior sample of the input, noised, and the last
            ``int(steps·(1 − fidelity))`` DDIM steps (algorithm.md §7.4).
        focus: 0 semantic … 0.5 neutral … 1 style (algorithm.md §8.1).
        color_adjust: ``"simple"`` (the WebUI default: match each output's per-channel mean/std
            to the input) or ``"none"``.
        width, height: output size (multiples of 8); default: the input's aspect ratio with the
            longer side 512. The input is resized to it (PIL bicubic) for CLIP, VAE and colours.
        options: sampling options (official defaults when ``None``).
        init_latent: optional unscaled latent to apply ``fidelity`` to instead of the input's.

    Returns:
        ``ImageFlowResult`` with ``(n, 3, height, width)`` images and their latents.
    """
    options = options or SamplingOptions()
    purpose = "image variation"
    check_images(image)
    check_count(n)
    if image.shape[0] not in (1, n):
        raise VDInputError(f"image variation got {image.shape[0]} images for {n} results; give 1 image or {n}")
    if not 0.0 <= fidelity <= 1.0:
        raise VDInputError(f"fidelity must be between 0 (new image) and 1 (the input itself), got {fidelity}")
    color_adjust = check_color_adjust(color_adjust)
    width, height = resolve_output_size(image, width, height)
    check_image_size(width, height)
    image_vae = models.require("image_vae", purpose)
    resized = resize_images(image, width, height)
    if fidelity == 1.0:  # the WebUI returns the resized input itself
        images = resized.expand(n, -1, -1, -1).float()
        return ImageFlowResult(images, image_vae.encode(images))

    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    contexts = [image_context(clip, resized, focus=focus)]
    noise = make_noise(options, n)
    start = init_latent
    if fidelity > 0.0 and start is None:
        start = encode_start_latent(image_vae, resized, noise, n)
    latents = sample_image(
        diffuser, contexts, width=width, height=height, n=n, options=options,
        init_latent=start, denoise=1.0 - fidelity, noise=noise,
    )
    return decode_images(image_vae, latents, resized if color_adjust == "simple" else None)
