"""k-diffusion-style samplers: Euler, Euler ancestral and DPM-Solver++(2M) over a denoiser.

These work in the variance-exploding view of the schedule (see ``vd_core.schedule``): a sample
at noise level ``σ`` is ``x = x0 + σ·n`` and a *denoiser* ``D(x, σ)`` estimates ``x0``. VD's
ε-prediction diffuser becomes a denoiser with :func:`eps_model_to_denoiser`.

A run, for a fresh sample::

    denoiser = eps_model_to_denoiser(GuidedEps(...))
    sigmas = sigmas_karras(steps, *sigma_range())          # or sigmas_uniform(steps)
    x = initial_latent(noise(torch.empty(shape)), sigmas)  # σ_max · n
    x = sample_dpmpp_2m(denoiser, x, sigmas)

and for image-to-image with strength ``denoise < 1``: ``sigmas = img2img_sigmas(sigmas, denoise)``
keeps the last ``round(denoise·steps)`` steps and ``initial_latent(n, sigmas, x0=clean)`` noises
the clean latent to the first kept level.

Sigma lists are 1-D tensors, descending, ending with 0. Samplers read them once on the host, so
the loops never wait for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import VDInputError
from ..schedule import alphas_cumprod as official_alphas_cumprod, sigma_to_t, sigmas_from_alphas, t_to_sigma
from .ddim import Callback, CancelCheck, EpsModel, raise_if_cancelled
from .noise import NoiseSource

# denoiser(x (B, ...), sigma (B,) float32) -> x0 estimate shaped like x.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sigmas(alphas_cumprod: torch.Tensor | None) -> torch.Tensor:
    """``(1000,)`` float64 sigmas of the training timesteps, increasing."""
    ac = official_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().cpu()
    return sigmas_from_alphas(ac.to(torch.float64))


def eps_model_to_denoiser(eps_model: EpsModel, alphas_cumprod: torch.Tensor | None = None) -> Denoiser:
    """Wrap VD's ε-prediction model as a denoiser ``D(x, σ) = x − σ·ε(x·c_in, t(σ))``.

    ``c_in = 1/sqrt(σ² + 1) = sqrt(ᾱ)`` maps the VE sample back to the model's variance-preserving
    input, and ``t(σ)`` is the continuous timestep of ``σ`` (:func:`vd_core.schedule.sigma_to_t`),
    so the diffuser receives fractional float32 timesteps between training steps.

    Args:
        eps_model: ``eps(x, t)`` with guidance applied.
        alphas_cumprod: ``(1000,)`` ᾱ; ``None`` is the official float32 schedule.
    """
    log_sigmas = _sigmas(alphas_cumprod).log().to(torch.float32)
    per_device: dict[torch.device, torch.Tensor] = {}

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        table = per_device.get(x.device)
        if table is None:
            table = per_device[x.device] = log_sigmas.to(x.device)
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        t = sigma_to_t(sigma, table)
        view = (-1,) + (1,) * (x.dim() - 1)
        c_in = (sigma**2 + 1.0).rsqrt().view(view).to(x.dtype)
        return x - sigma.view(view).to(x.dtype) * eps_model(x * c_in, t)

    return denoiser


def sigma_range(alphas_cumprod: torch.Tensor | None = None) -> tuple[float, float]:
    """``(σ_min, σ_max)`` of the schedule: σ at t = 0 and t = 999 (≈0.0292 and ≈14.61 for VD)."""
    sigmas = _sigmas(alphas_cumprod)
    return float(sigmas[0]), float(sigmas[-1])


def _check_steps(steps: int) -> int:
    if int(steps) < 1:
        raise VDInputError(f"sampler steps must be ≥ 1, got {steps}")
    return int(steps)


def sigmas_uniform(steps: int, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Noise levels of ``steps`` timesteps spaced uniformly from 999 to 0, then 0.

    Returns:
        ``(steps + 1,)`` float32 CPU tensor, descending from σ_max, last entry 0.
    """
    log_sigmas = _sigmas(alphas_cumprod).log()
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, _check_steps(steps), dtype=torch.float64)
    return torch.cat([t_to_sigma(t, log_sigmas), t.new_zeros(1)]).to(torch.float32)


def sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) spacing: uniform in ``σ^(1/ρ)`` from σ_max to σ_min, then 0.

    Returns:
        ``(steps + 1,)`` float32 CPU tensor, descending, last entry 0.
    """
    if not 0 < sigma_min < sigma_max:
        raise VDInputError(f"Karras sigmas need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, _check_steps(steps), dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def img2img_sigmas(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of a sigma list for image-to-image with strength ``denoise`` ∈ [0, 1].

    Keeps the last ``round(denoise·steps)`` steps (``steps = len(sigmas) − 1``): denoise 1 is the
    whole list, 0 only the final 0 (no step runs; the clean latent comes back). Noise the clean
    latent to the first kept level with ``initial_latent(n, kept, x0=clean)``.
    """
    if not 0.0 <= denoise <= 1.0:
        raise VDInputError(f"denoise must be between 0 and 1, got {denoise}")
    steps = sigmas.shape[0] - 1
    kept = round(denoise * steps)
    return sigmas[steps - kept :]


def initial_latent(noise: torch.Tensor, sigmas: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The sample the k-samplers start from: ``x0 + σ_start·noise`` (``x0 = 0``: ``σ_max·noise``).

    Args:
        noise: ``(B, ...)`` standard-normal draw (from the run's ``NoiseSource``).
        sigmas: the sigma list the sampler will run (``sigmas[0]`` = σ_start).
        x0: optional clean sample in diffusion space (image-to-image).
    """
    start = noise * float(sigmas[0])
    return start if x0 is None else x0 + start


def _levels(sigmas: torch.Tensor) -> list[float]:
    if sigmas.dim() != 1 or sigmas.shape[0] < 1:
        raise VDInputError(f"sigmas must be a 1-D list of noise levels ending with 0, got shape {tuple(sigmas.shape)}")
    return [float(s) for s in sigmas.detach().cpu().tolist()]


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ → σ_next into a deterministic part to ``σ_down`` and fresh noise ``σ_up``.

    ``σ_down² + σ_up² = σ_next²``; ``σ_up`` is η times the DDPM posterior standard deviation
    (capped at σ_next), so η = 0 gives the deterministic step.
    """
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dσ = (x − D(x, σ))/σ``.

    Args:
        denoiser: ``D(x, σ)``.
        x: ``(B, ...)`` starting sample at ``sigmas[0]`` (see :func:`initial_latent`).
        sigmas: descending noise levels ending with 0.
        callback: ``callback(step, total, x, x0_estimate)`` after every step.
        cancel: ``cancel() -> bool`` checked before every step; True raises ``Cancelled``.

    Returns:
        The sample at ``sigmas[-1]``.
    """
    levels = _levels(sigmas)
    total = len(levels) - 1
    for step in range(total):
        raise_if_cancelled(cancel, step, total)
        sigma, sigma_next = levels[step], levels[step + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x))
        x = x + (x - denoised) * ((sigma_next - sigma) / sigma)
        if callback is not None:
            callback(step, total, x, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    noise: NoiseSource,
    callback: Callback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Euler steps to ``σ_down`` plus fresh noise ``σ_up·n`` (see :func:`ancestral_step`).

    Args:
        eta: amount of fresh noise, 0 (= :func:`sample_euler`) … 1 (ancestral sampling).
        noise: draws ``n`` at every step that adds noise (not at the last, noiseless step).
        Others as :func:`sample_euler`.
    """
    levels = _levels(sigmas)
    total = len(levels) - 1
    for step in range(total):
        raise_if_cancelled(cancel, step, total)
        sigma, sigma_next = levels[step], levels[step + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) * ((sigma_down - sigma) / sigma)
        if sigma_up > 0.0:
            x = x + noise(x) * sigma_up
        if callback is not None:
            callback(step, total, x, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in ``λ = −log σ``.

    Each step is the exact solution of the ODE for a denoiser held at ``D̂`` over the step,
    ``x ← (σ_next/σ)·x + (1 − σ_next/σ)·D̂``, where ``D̂`` extrapolates the current and previous
    denoiser outputs linearly in λ: ``D̂ = D + (D − D_prev)/(2r)``, ``r = h_prev/h``,
    ``h = log(σ/σ_next)``. The first step and the last step (to σ = 0) are first order.

    Args: as :func:`sample_euler`.
    """
    levels = _levels(sigmas)
    total = len(levels) - 1
    previous: torch.Tensor | None = None
    h_previous = 0.0
    for step in range(total):
        raise_if_cancelled(cancel, step, total)
        sigma, sigma_next = levels[step], levels[step + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x))
        if sigma_next == 0.0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised if previous is None else denoised + (denoised - previous) * (h / (2.0 * h_previous))
            x = x * (sigma_next / sigma) + estimate * (-math.expm1(-h))
            h_previous = h
        previous = denoised
        if callback is not None:
            callback(step, total, x, denoised)
    return x
