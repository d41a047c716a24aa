"""VD's own samplers (the exact official DDIM, fidelity, k-samplers) run through ComfyUI's sampling
(needs ComfyUI; imported lazily).

The VD sampler nodes and core KSampler sample the same ``MODEL``: ComfyUI loads it (LoRA weights
patched in, ``--lowvram`` streaming), evaluates the conditioning (ControlNet, areas, masks), applies
classifier-free guidance with every model patch (SAG, PAG, FreeU, attention patches …) and honours a
LATENT's ``noise_mask``. Only the step rule is VD's: ``vd_core``'s sampler loop runs over ComfyUI's
guided denoiser, as a ``KSAMPLER`` function. VD's samplers work in the variance-preserving space
(``x_vp``, algorithm.md §7); ComfyUI's denoiser in k-diffusion's (``x = x_vp·√(1+σ²)``, returns x₀), so
ε = (x − D(x, σ)) / σ is exact up to rounding (≈1e-6 relative).
"""

from __future__ import annotations

import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import latent_preview
import torch

from ..vd_core.flows.options import SamplingOptions
from ..vd_core.flows.sampling import check_options, fidelity_steps, k_sampler_sigmas, run_sampler
from ..vd_core.samplers import NoiseSource, ddim_timesteps
from .conditioning import conditioning_pair


class StartNoise:
    """A `NoiseSource` whose first draw is ``first`` (the start noise ComfyUI was given), and whose
    later draws continue ``rest``: the official draw order (algorithm.md §7.4) with one tensor shared."""

    def __init__(self, first: torch.Tensor, rest: NoiseSource):
        self.first, self.rest = first, rest

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            return self.rest(like)
        first, self.first = self.first, None
        return first.to(device=like.device, dtype=like.dtype)

    def split(self, n: int) -> list[tuple[slice, torch.Generator]]:
        return self.rest.split(n)


def _eps_model(denoiser, extra_args: dict, model_sampling):
    """VD's ``eps(x_vp (B, ...), t (B,)) -> ε`` over ComfyUI's guided denoiser ``D(x, σ) -> x₀``."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = model_sampling.sigma(t.to(torch.float32)).to(x.dtype)
        s = sigma.view(-1, *([1] * (x.dim() - 1)))
        x_k = x * (s * s + 1.0).sqrt()
        return (x_k - denoiser(x_k, sigma, **extra_args)) / s

    return eps


def _vd_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, *, options, noise, denoise):
    """A KSAMPLER function: ComfyUI's noise-scaled ``x`` is not used, VD's samplers make their own
    start from ``noise`` (the same tensor) so official seeds reproduce bit for bit."""
    model_sampling = model.inner_model.inner_model.model_sampling
    eps = _eps_model(model, extra_args or {}, model_sampling)
    x0 = model.latent_image if denoise < 1.0 else None
    return run_sampler(eps, torch.zeros_like(x), options, noise, x0, denoise)


def visited_sigmas(options: SamplingOptions, denoise: float, model_sampling) -> torch.Tensor:
    """The noise levels the VD sampler will visit, then 0 (ComfyUI's patches and ControlNet ranges
    read them; VD's sampler keeps its own schedule)."""
    if options.sampler == "ddim":
        timesteps = ddim_timesteps(options.steps)
        if denoise < 1.0:  # the fidelity path runs the first k timesteps (algorithm.md §7.4)
            timesteps = timesteps[: fidelity_steps(options, denoise)]
        sigmas = model_sampling.sigma(timesteps.flip(0).to(torch.float32))
        return torch.cat([sigmas.cpu(), sigmas.new_zeros(1).cpu()])
    return k_sampler_sigmas(options, denoise)


def sample_image_latent(model, contexts, latent: torch.Tensor, *, options: SamplingOptions, noise: NoiseSource,
                        denoise: float = 1.0, noise_mask: torch.Tensor | None = None,
                        conditioning: tuple[list, list] | None = None) -> torch.Tensor:
    """Sample image latents with VD's sampler on a ComfyUI ``MODEL``.

    Args:
        model: the VD image MODEL (a ModelPatcher), possibly patched (LoRA, FreeU …).
        contexts: a ``VD_CONTEXT``.
        latent: ``(B, 4, h, w)`` **unscaled** start latents (zeros for text→image).
        options: steps, guidance, sampler, scheduler, eta, seed, callback ``(step, total, x, x0)``
            with x/x0 in diffusion space, cancel.
        noise: per-item noise sources (the first draw is the start noise).
        denoise: < 1 runs image-to-image from ``latent`` (DDIM: the official fidelity path).
        noise_mask: optional ``(B | 1, 1, H, W)`` ComfyUI noise mask (1 = redraw).
        conditioning: optional core ``(positive, negative)`` CONDITIONING made by 'VD Context to
            Conditioning' and possibly passed through conditioning nodes (Apply ControlNet, areas,
            timestep ranges); used instead of the pair made from ``contexts`` (which may then be None).

    Returns:
        ``(B, 4, h, w)`` unscaled latents on ComfyUI's intermediate device.
    """
    check_options(options)
    start = latent if denoise < 1.0 else torch.zeros_like(latent)
    if denoise < 1.0 and options.sampler == "ddim" and fidelity_steps(options, denoise) == 0:
        return latent  # nothing to denoise (the WebUI's fidelity 1)
    first = noise(torch.zeros_like(latent, dtype=torch.float32))
    positive, negative = conditioning if conditioning is not None else conditioning_pair(contexts)
    model_sampling = model.get_model_object("model_sampling")
    sampler = comfy.samplers.KSAMPLER(
        _vd_sampler, extra_options={"options": options, "noise": StartNoise(first, noise), "denoise": denoise})
    samples = comfy.sample.sample_custom(
        model, first, options.guidance, sampler, visited_sigmas(options, denoise, model_sampling), positive, negative,
        start, noise_mask=noise_mask, callback=None, disable_pbar=True, seed=options.seed)
    if noise_mask is not None:
        # VD's DDIM ends one step short of x₀ (ᾱ_prev = ᾱ[0] < 1, algorithm.md §7.2), so the kept region
        # would drift by √(1−ᾱ[0])·ε; put the input back there, as a sampler ending at σ = 0 would.
        keep = 1.0 - comfy.sampler_helpers.prepare_mask(noise_mask, samples.shape, samples.device)
        samples = samples * (1.0 - keep) + latent.to(samples) * keep
    return samples


def preview_callback(model, steps: int):
    """A VD sampler callback ``(step, total, x, x0)`` that drives the node's progress bar and latent
    previews (the user's ``--preview-method``), as core KSampler's."""
    report = latent_preview.prepare_callback(model, steps)

    def callback(step, total, x, x0):
        report(step, x0, x, total)

    return callback

