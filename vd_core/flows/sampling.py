"""Sampling glue shared by every flow: options → sampler, contexts → guided ε, seed → noise.

The two entry points, :func:`sample_image` and :func:`sample_text`, are what the ComfyUI nodes and
the high-level flows call. They validate the user's values, pick the exact official DDIM sampler
(algorithm.md §7) or a k-diffusion-style sampler, apply classifier-free guidance over any number of
contexts (algorithm.md §7.3), and convert image latents between the public unscaled convention and the
diffusion space (``× LATENT_SCALE``, algorithm.md §6.1) at this boundary only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..contexts import ContextKind, GuidedContext
from ..diffuser import ContextInput
from ..errors import VDInputError
from ..image_vae import LATENT_SCALE
from ..memory_budget import check_image_run_fits
from ..samplers import (
    BatchNoise,
    GuidedEps,
    NoiseSource,
    PerItemNoise,
    ddim_noised_start,
    eps_model_to_denoiser,
    img2img_sigmas,
    initial_latent,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigma_range,
    sigmas_karras,
    sigmas_uniform,
)
from ..validation import check_finite, check_finite_number, check_result, check_seed, generator_seed
from .options import MAX_GUIDANCE, SAMPLER_NAMES, SCHEDULER_NAMES, SamplingOptions

log = logging.getLogger(__name__)


def check_options(options: SamplingOptions) -> None:
    """Raise :class:`VDInputError` naming the field and the fix when ``options`` cannot be used."""
    if isinstance(options.steps, bool) or not isinstance(options.steps, int) or options.steps < 1:
        raise VDInputError(f"steps must be a whole number ≥ 1, got {options.steps!r}; 50 is the official value")
    guidance = check_finite_number(options.guidance, "guidance", "7.5 is the official value")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise VDInputError(
            f"guidance must be in 0 … {MAX_GUIDANCE:g}, got {options.guidance}; 7.5 is the official value (1 = no guidance)"
        )
    check_seed(options.seed)
    if options.sampler not in SAMPLER_NAMES:
        raise VDInputError(f"unknown sampler {options.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    if options.scheduler not in SCHEDULER_NAMES:
        raise VDInputError(f"unknown scheduler {options.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if options.eta is not None and (not math.isfinite(options.eta) or options.eta < 0):
        raise VDInputError(f"eta must be ≥ 0, got {options.eta}; 0 is deterministic DDIM")


def _eta(options: SamplingOptions) -> float:
    """The η to use: the caller's, else 0 for DDIM (official) and 1 for ancestral sampling."""
    if options.eta is not None:
        return options.eta
    return 1.0 if options.sampler == "euler_ancestral" else 0.0


def check_count(n: int, what: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VDInputError(f"{what} (the number of results) must be a whole number ≥ 1, got {n!r}")


def check_image_size(width: int, height: int) -> None:
    """Sizes must be positive multiples of 8: the image VAE downsamples by 8 (algorithm.md §6.1)."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
            fix = max(8, 8 * round(value / 8)) if isinstance(value, (int, float)) and value > 0 else 512
            raise VDInputError(f"{name} must be a positive multiple of 8, got {value!r}; use {fix}")


def make_noise(options: SamplingOptions, n: int) -> NoiseSource:
    """The run's noise source (see :class:`SamplingOptions`: official order or one seed per item)."""
    if options.per_item_seeds:
        return PerItemNoise([generator_seed(options.seed, i) for i in range(n)])
    return BatchNoise(generator_seed(options.seed, 100))  # the WebUI's torch.manual_seed(seed + 100), algorithm.md §8


def encode_start_latent(image_vae, images: torch.Tensor, noise: NoiseSource, n: int) -> torch.Tensor:
    """A VAE posterior sample of ``images`` to start image-to-image from, drawn first (algorithm.md §7.4).

    The WebUI encodes its one input image once, from the run's generator, and repeats the sample
    to the batch; with per-item seeds each item draws its own sample, as a single run would.

    Args:
        image_vae: ``ImageVAE``.
        images: ``(1 | n, 3, H, W)`` in [0, 1].
        noise: the run's noise source (:func:`make_noise`), continued afterwards by the sampler.

    Returns:
        ``(1 | n, 4, H/8, W/8)`` unscaled latents.
    """
    return torch.cat([image_vae.encode(images[rows] if images.shape[0] == n else images[:1], generator=generator)
                      for rows, generator in noise.split(n)])


@torch.no_grad()
def sample_image(
    diffuser,
    contexts: Sequence[GuidedContext],
    *,
    width: int,
    height: int,
    n: int,
    options: SamplingOptions,
    init_latent: torch.Tensor | None = None,
    denoise: float = 1.0,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Sample ``n`` image latents.

    Args:
        diffuser: ``FourFlowDiffuser`` with the image data layers and the contexts' layers.
        contexts: one or more :class:`GuidedContext` (batch 1 or ``n``).
        width, height: output size in pixels, positive multiples of 8.
        n: number of images.
        options: steps, guidance, sampler, seed, callback (``x`` and ``x0_estimate`` in diffusion
            space, i.e. scaled latents), cancel, device/dtype (the diffuser is moved there).
        init_latent: optional **unscaled** ``(1 | n, 4, height/8, width/8)`` latent to start from.
        denoise: how much of the schedule to run from ``init_latent`` (0…1): the last
            ``int(steps·denoise)`` steps (DDIM: the official fidelity path from the noised latent,
            algorithm.md §7.4) or ``round(steps·denoise)`` steps (k-samplers) of a ``steps``-step
            schedule. 0 returns ``init_latent``; 1 (or no ``init_latent``) starts from pure noise.
        noise: the run's noise source when the caller already drew from it (a VAE posterior
            sample); ``None`` makes one from ``options``.

    Returns:
        ``(n, 4, height/8, width/8)`` unscaled latents (ComfyUI's LATENT convention).
    """
    check_options(options)
    check_count(n)
    check_image_size(width, height)
    device, dtype = _placement(diffuser, options)
    check_image_run_fits(n, width, height, device=device, dtype=dtype, model_channels=diffuser.config.model_channels,
                         guided=options.guidance != 1)
    shape = (n, diffuser.config.in_channels, height // 8, width // 8)
    x0 = None
    if init_latent is not None:
        check_finite(init_latent, "init_latent", "encode the start image again (VAE Encode)")
        if init_latent.dim() != 4 or init_latent.shape[0] not in (1, n) or tuple(init_latent.shape[1:]) != shape[1:]:
            raise VDInputError(
                f"init_latent has shape {tuple(init_latent.shape)} but a {width}×{height} run of {n} needs "
                f"(1 or {n}, {shape[1]}, {shape[2]}, {shape[3]}); resize the image or pass width/height to match"
            )
        x0 = init_latent.to(device=device, dtype=dtype).expand(shape) * LATENT_SCALE
    eps = _guided_eps(diffuser, contexts, "image", n, options, device, dtype)
    x = run_sampler(eps, torch.zeros(shape, device=device, dtype=dtype), options, noise or make_noise(options, n), x0, denoise)
    return check_result(x / LATENT_SCALE, "the sampled image latents")


@torch.no_grad()
def sample_text(
    diffuser,
    contexts: Sequence[GuidedContext],
    *,
    n: int,
    options: SamplingOptions,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Sample ``n`` Optimus text latents (no latent scaling for text, algorithm.md §6.2).

    Args:
        diffuser: ``FourFlowDiffuser`` with the text data layers and the contexts' layers.
        contexts: one or more :class:`GuidedContext`; ``text_flow_uncond`` replaces ``uncond``.
        n: number of latents; options: as for :func:`sample_image`.
        noise: the run's noise source (``None``: made from ``options``); pass one to keep drawing
            from it afterwards (the official Optimus sampling continues the same generator).

    Returns:
        ``(n, L)`` text latents, L = the diffuser's text latent size (768 full size).
    """
    check_options(options)
    check_count(n)
    device, dtype = _placement(diffuser, options)
    eps = _guided_eps(diffuser, contexts, "text", n, options, device, dtype)
    like = torch.zeros(n, diffuser.config.text_latent_dim, device=device, dtype=dtype)
    return check_result(run_sampler(eps, like, options, noise or make_noise(options, n), None, 1.0), "the sampled text latents")


def _placement(diffuser, options: SamplingOptions) -> tuple[torch.device, torch.dtype]:
    """Where to sample: the diffuser's device and dtype, which the options may only confirm.

    A diffuser is shared (a ComfyUI graph, several threads): converting it in place for one run
    would change it under another run, so a different device or dtype is refused with the fix.
    """
    parameter = next(diffuser.parameters())
    device = torch.device(options.device) if options.device is not None else parameter.device
    dtype = options.dtype or parameter.dtype
    if device.type == parameter.device.type and device.index is None:
        device = parameter.device  # "cuda" names the diffuser's own GPU
    if (parameter.device, parameter.dtype) != (device, dtype):
        raise VDInputError(
            f"the diffuser is on {parameter.device} in {parameter.dtype} but sampling was asked on {device} in {dtype}; "
            "it is not converted in place (another run may be using it): load it there, e.g. "
            f"load_models(..., device={str(device)!r}, dtype={dtype}), or leave SamplingOptions.device/dtype unset"
        )
    return device, dtype


def _guided_eps(diffuser, contexts, data_kind: ContextKind, n, options, device, dtype) -> GuidedEps:
    if not contexts:
        raise VDInputError("no context given: a flow needs at least one prompt or image")
    for i, c in enumerate(contexts):
        check_finite_number(c.ratio, f"the strength (ratio) of context {i + 1} ({c.kind})", "use a value in 0 … 1")
        check_finite(c.cond, f"the {c.kind} context {i + 1}", "encode the prompt or image again")
    kept = [c for c in contexts if c.ratio > 0]  # a zero-ratio context adds 0·Δ (algorithm.md §4.3)
    if not kept:
        raise VDInputError("every context has strength 0; give at least one a strength above 0")

    def tokens(t: torch.Tensor, kind: str) -> torch.Tensor:
        if t.shape[0] not in (1, n):
            raise VDInputError(f"a {kind} context has batch {t.shape[0]} but {n} results were asked for; use 1 or {n}")
        return t.to(device=device, dtype=dtype).expand(n, *t.shape[1:])

    cond = [ContextInput(c.kind, tokens(c.cond, c.kind), c.ratio) for c in kept]
    uncond = [ContextInput(c.kind, tokens(c.uncond_for(data_kind), c.kind), c.ratio) for c in kept]
    return GuidedEps(diffuser, cond, None if options.guidance == 1 else uncond, options.guidance)


def fidelity_steps(options: SamplingOptions, denoise: float) -> int:
    """DDIM steps the official fidelity path runs from a start latent: ``int(steps·denoise)``, the
    WebUI's ``int(steps·(1 − fidelity))`` (algorithm.md §8); 0 returns the start latent."""
    return int(options.steps * denoise)


def k_sampler_sigmas(options: SamplingOptions, denoise: float = 1.0) -> torch.Tensor:
    """The k-samplers' noise levels, ending at 0: uniform or Karras spacing, and for image-to-image
    (``denoise`` < 1) the last part of that schedule, the same step count as DDIM's fidelity path."""
    if options.scheduler == "karras":
        sigmas = sigmas_karras(options.steps, *sigma_range())
    else:
        sigmas = sigmas_uniform(options.steps)
    return img2img_sigmas(sigmas, denoise) if denoise < 1.0 else sigmas


def run_sampler(eps, like: torch.Tensor, options: SamplingOptions, noise: NoiseSource, x0=None,
                denoise: float = 1.0) -> torch.Tensor:
    """Run the chosen sampler in diffusion space and return the final sample.

    Args:
        eps: ``EpsModel`` ``(x (B, ...), t (B,)) -> ε`` with guidance applied (a host may supply its
            own, e.g. ComfyUI's guided denoiser).
        like: a zero tensor of the sample's shape, dtype and device.
        noise: the run's noise source; its first draw is the start noise (algorithm.md §7.4).
        x0: optional scaled start latent; with ``denoise`` < 1 it selects image-to-image.
    """
    if not 0.0 <= denoise <= 1.0:
        raise VDInputError(f"denoise must be between 0 and 1, got {denoise}; 1 starts from pure noise")
    from_x0 = x0 is not None and denoise < 1.0
    hooks = {"callback": options.callback, "cancel": options.cancel}
    if options.sampler == "ddim":
        ddim = {"eta": _eta(options), "noise": noise, **hooks}
        if not from_x0:
            return sample_ddim(eps, noise(like), options.steps, **ddim)
        k = fidelity_steps(options, denoise)
        if k == 0:
            return x0
        x, start_step = ddim_noised_start(x0, options.steps, k, noise)
        return sample_ddim(eps, x, options.steps, start_step=start_step, **ddim)

    sigmas = k_sampler_sigmas(options, denoise if from_x0 else 1.0)
    x = initial_latent(noise(like), sigmas, x0 if from_x0 else None)
    denoiser = eps_model_to_denoiser(eps)
    if options.sampler == "euler_ancestral":
        return sample_euler_ancestral(denoiser, x, sigmas, eta=_eta(options), noise=noise, **hooks)
    sampler = sample_euler if options.sampler == "euler" else sample_dpmpp_2m
    return sampler(denoiser, x, sigmas, **hooks)
