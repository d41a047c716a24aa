"""Samplers: the exact official DDIM (algorithm.md §7), k-diffusion-style samplers, guidance, noise.

See docs/ARCHITECTURE.md "Sampler contract". Everything a flow needs is re-exported here.
"""

from .ddim import (
    Callback,
    CancelCheck,
    DDIMSchedule,
    EpsModel,
    ddim_noised_start,
    ddim_schedule,
    ddim_timesteps,
    sample_ddim,
)
from .guidance import GuidedEps
from .k_samplers import (
    Denoiser,
    ancestral_step,
    eps_model_to_denoiser,
    img2img_sigmas,
    initial_latent,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigma_range,
    sigmas_karras,
    sigmas_uniform,
)
from .noise import BatchNoise, NoiseSource, PerItemNoise

__all__ = [
    "BatchNoise",
    "Callback",
    "CancelCheck",
    "DDIMSchedule",
    "Denoiser",
    "EpsModel",
    "GuidedEps",
    "NoiseSource",
    "PerItemNoise",
    "ancestral_step",
    "ddim_noised_start",
    "ddim_schedule",
    "ddim_timesteps",
    "eps_model_to_denoiser",
    "img2img_sigmas",
    "initial_latent",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sigma_range",
    "sigmas_karras",
    "sigmas_uniform",
]
