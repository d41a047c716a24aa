"""The VD/Stable-Diffusion noise schedule (algorithm.md §2) and its k-diffusion view.

VD is trained on 1000 discrete timesteps with the LDM "linear" schedule
``betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)²`` and ε-prediction. The official model
computes every schedule buffer in float64 and stores it as float32; ``net.half()`` (the WebUI's
fp16 mode) then rounds those float32 buffers to float16. The functions here reproduce both
roundings exactly.

The k-diffusion view describes the same schedule by the noise level of the variance-exploding
parameterisation, ``sigma = sqrt((1 − ᾱ) / ᾱ)`` (``x_VE = x_VP / sqrt(ᾱ)``), with continuous
timesteps obtained by piecewise-linear interpolation in ``log sigma``.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def _alphas_cumprod_float64() -> torch.Tensor:
    """``(1000,)`` float64 ᾱ, before any rounding (algorithm.md §2)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _sqrt64(values64: torch.Tensor) -> torch.Tensor:
    # The official takes these square roots with numpy (correctly rounded); torch's CPU sqrt may
    # differ in the last bit.
    return torch.from_numpy(np.sqrt(values64.numpy()))


def _official_buffer(values64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The model stores float32 buffers; fp16 mode rounds those again. Rounding float64 straight to
    # float16 can differ in the last bit (double rounding), so always go through float32.
    return values64.to(torch.float32).to(dtype)


def alphas_cumprod(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ᾱ_t for t = 0 … 999 as the official model holds it.

    Args:
        dtype: ``torch.float32`` (the official buffer) or ``torch.float16`` (what the WebUI's
            ``net.half()`` turns it into; the fp16 DDIM sampler reads those values).

    Returns:
        ``(1000,)`` CPU tensor in ``dtype``, decreasing from 0.99915 to 0.0046601.
    """
    return _official_buffer(_alphas_cumprod_float64(), dtype)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward noising ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise`` (algorithm.md §2).

    Args:
        x0: ``(B, ...)`` clean sample (diffusion space: scaled image latent or text latent).
        t: ``(B,)`` integer timesteps in ``[0, 999]``.
        noise: standard-normal tensor shaped like ``x0``.
        alphas_cumprod: ``None`` uses the official buffers ``sqrt_alphas_cumprod`` and
            ``sqrt_one_minus_alphas_cumprod`` (square roots taken in float64, stored as float32,
            then cast to ``x0``'s dtype as ``net.half()`` does) — bit-exact with the official.
            A tensor gives another ``(1000,)`` schedule; its square roots are taken in float64.

    Returns:
        ``x_t`` shaped and typed like ``x0``.
    """
    if alphas_cumprod is None:
        ac64 = _alphas_cumprod_float64()
        sqrt_ac = _official_buffer(_sqrt64(ac64), x0.dtype)
        sqrt_one_minus_ac = _official_buffer(_sqrt64(1.0 - ac64), x0.dtype)
    else:
        ac64 = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        sqrt_ac = _sqrt64(ac64).to(x0.dtype)
        sqrt_one_minus_ac = _sqrt64(1.0 - ac64).to(x0.dtype)
    index = t.to(device=x0.device, dtype=torch.long)
    view = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_ac.to(x0.device)[index].view(view)
    b = sqrt_one_minus_ac.to(x0.device)[index].view(view)
    return a * x0 + b * noise


def sigmas_from_alphas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise levels ``sigma_t = sqrt((1 − ᾱ_t) / ᾱ_t)`` of the variance-exploding view.

    Args:
        alphas_cumprod: ``(T,)`` ᾱ, decreasing.

    Returns:
        ``(T,)`` increasing sigmas (≈0.0292 … 14.61 for VD), computed in float64 and returned in
        ``alphas_cumprod``'s dtype promoted to at least float32 (float16 would lose the range).
    """
    ac64 = alphas_cumprod.to(torch.float64)
    out_dtype = torch.promote_types(alphas_cumprod.dtype, torch.float32)
    return ((1.0 - ac64) / ac64).sqrt().to(out_dtype)


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of a noise level, interpolating linearly in ``log sigma``.

    The inverse of :func:`t_to_sigma` (k-diffusion's ``DiscreteSchedule.sigma_to_t``): between
    two training timesteps ``i`` and ``i+1``, ``t = i + w`` where ``w`` is the position of
    ``log sigma`` between ``log_sigmas[i]`` and ``log_sigmas[i+1]``. Sigmas outside the table are
    clamped to ``[0, T−1]``.

    Args:
        sigma: any shape, positive.
        log_sigmas: ``(T,)`` increasing ``log(sigmas_from_alphas(...))`` on ``sigma``'s device.

    Returns:
        Float timesteps in ``[0, T−1]``, shaped like ``sigma``, in ``log_sigmas``'s dtype.
    """
    log_sigma = sigma.to(log_sigmas.dtype).log()
    last = log_sigmas.shape[0] - 1
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, last - 1)
    low_log, high_log = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma.reshape(-1) - low_log) / (high_log - low_log)).clamp(0.0, 1.0)
    return (low.to(log_sigmas.dtype) + w).reshape(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level of a (possibly fractional) timestep: linear interpolation of ``log sigma``.

    Args:
        t: any shape, values in ``[0, T−1]``.
        log_sigmas: ``(T,)`` increasing log sigmas on ``t``'s device.

    Returns:
        Sigmas shaped like ``t``, in ``log_sigmas``'s dtype.
    """
    t = t.to(log_sigmas.dtype)
    low = t.floor().long().clamp(0, log_sigmas.shape[0] - 1)
    high = t.ceil().long().clamp(0, log_sigmas.shape[0] - 1)
    w = t - low.to(t.dtype)
    return ((1.0 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
