"""The official VD DDIM sampler, bit for bit (algorithm.md §7).

Three details make it differ from a textbook DDIM, and all are reproduced:

* model timesteps are ``range(0, 1000, 1000 // S) + 1``; S not dividing 1000 gives extra steps;
* the last step's "previous" ᾱ is ``ᾱ[0] = 0.99915``, not 1;
* a normal draw is taken at every step, even at η = 0, so a seed gives the official result.

Coefficient precision follows the official ``make_schedule`` (algorithm.md §7.1) so that float32 runs
match to the last bit: ``a_t`` and ``sqrt(1 − a_t)`` in the schedule's dtype, ``a_prev`` and
``sigma`` in float64, each cast to the sample dtype before the step arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..errors import Cancelled, VDInputError
from ..schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod as official_alphas_cumprod, q_sample
from .noise import NoiseSource

logger = logging.getLogger(__name__)

# eps(x (B, ...), t (B,)) -> ε (B, ...), guidance already applied (see guidance.GuidedEps).
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step, total, x after the step, x0 estimate of the step); step counts 0 … total−1.
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# cancel() -> True asks the sampler to stop; checked before every step.
CancelCheck = Callable[[], bool]


def raise_if_cancelled(cancel: CancelCheck | None, step: int, total: int) -> None:
    """Raise :class:`Cancelled` when the host asked to stop (between sampler steps)."""
    if cancel is not None and cancel():
        raise Cancelled(f"sampling cancelled before step {step + 1} of {total}")


def ddim_timesteps(steps: int) -> torch.Tensor:
    """Official model timesteps for ``steps`` DDIM steps, ascending (algorithm.md §7.1).

    ``c = 1000 // steps``; ``range(0, 1000, c) + 1``. S = 50 gives 1, 21, …, 981; S = 7 gives
    8 timesteps (1, 143, …, 995). Sampling runs them in reverse.

    Where ``1000 - 1`` is a multiple of ``c`` (S = 3, 9, 27, 37, 111, 333, ≥ 501) the official
    sequence ends at t = 1000, past the schedule, and the official sampler crashes; that
    timestep is dropped here (S = 9 then gives exactly 9 steps).

    Returns:
        ``(S',)`` int64 tensor, ``S' = ceil(1000 / c)`` minus the dropped timestep.
    """
    if not 1 <= int(steps) <= NUM_TRAIN_TIMESTEPS:
        raise VDInputError(f"DDIM steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    stride = NUM_TRAIN_TIMESTEPS // int(steps)
    timesteps = torch.arange(0, NUM_TRAIN_TIMESTEPS, stride, dtype=torch.long) + 1
    return timesteps[timesteps < NUM_TRAIN_TIMESTEPS]


class DDIMSchedule(NamedTuple):
    """Per-timestep DDIM coefficients in the official dtypes (index i ↔ ``timesteps[i]``).

    Attributes:
        timesteps: ``(S',)`` int64 ascending model timesteps.
        alphas: ``(S',)`` ``a_t = ᾱ[timesteps]`` in the schedule's dtype.
        alphas_prev: ``(S',)`` float64 ``[ᾱ[0]] + ᾱ[timesteps[:-1]]``.
        sigmas: ``(S',)`` float64 ``η·sqrt((1 − a_prev)/(1 − a_t)·(1 − a_t/a_prev))``.
        sqrt_one_minus_alphas: ``(S',)`` ``sqrt(1 − a_t)`` in the schedule's dtype.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor


def ddim_schedule(steps: int, eta: float = 0.0, alphas_cumprod: torch.Tensor | None = None) -> DDIMSchedule:
    """The official ``make_schedule`` for ``steps`` steps and ``eta`` (algorithm.md §7.1).

    Args:
        steps: requested DDIM steps (1 … 1000).
        eta: η ∈ [0, 1]; 0 is deterministic DDIM, 1 the DDPM-like posterior variance.
        alphas_cumprod: ``(1000,)`` ᾱ; ``None`` is the official float32 schedule. Pass
            ``schedule.alphas_cumprod(torch.float16)`` to reproduce the WebUI's fp16 sampler.
    """
    if not 0.0 <= eta <= 1.0:
        # Above 1, sigma² exceeds 1 − a_prev at some step and the official step takes sqrt(< 0).
        raise VDInputError(f"DDIM eta must be between 0 and 1, got {eta}")
    ac = official_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().cpu()
    if ac.shape != (NUM_TRAIN_TIMESTEPS,) or ac.dtype not in (torch.float16, torch.float32, torch.float64):
        raise VDInputError(
            f"alphas_cumprod must be a ({NUM_TRAIN_TIMESTEPS},) float16/32/64 tensor "
            f"(vd_core.schedule.alphas_cumprod), got {tuple(ac.shape)} {ac.dtype}"
        )
    timesteps = ddim_timesteps(steps)
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]]).to(torch.float64)
    # The official mixes numpy and torch here; to match its last bit: 1/(1 − a_t) is a reciprocal
    # in the schedule's dtype (torch's reflected division) and both square roots are numpy's
    # (correctly rounded; torch's CPU sqrt may differ by an ulp).
    ratio = (1.0 - alphas_prev) * (1.0 - alphas).reciprocal().to(torch.float64)
    variance = ratio * (1.0 - alphas.to(torch.float64) / alphas_prev)
    sigmas = eta * torch.from_numpy(np.sqrt(variance.numpy()))
    sqrt_one_minus_alphas = torch.from_numpy(np.sqrt((1.0 - alphas).numpy()))
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas, sqrt_one_minus_alphas)


def ddim_noised_start(
    x0: torch.Tensor,
    steps: int,
    k: int,
    noise: NoiseSource,
) -> tuple[torch.Tensor, int]:
    """Noise a clean sample for the official fidelity / image-to-image path (algorithm.md §7.4).

    The official sampler noises ``x0`` to ``timesteps[k]`` and then runs only the first ``k``
    timesteps, the first of which is ``timesteps[k−1]``: the first denoising step treats a
    sample one DDIM step noisier than its timestep says. That off-by-one (algorithm.md §11.4) is kept on
    purpose so results match the official; e.g. 10 steps, k = 6: noised to t = 601, denoising
    starts at t = 501.

    Args:
        x0: ``(B, ...)`` clean sample in diffusion space (image latent × 0.18215).
        steps: requested DDIM steps.
        k: number of DDIM steps to run, ``1 ≤ k < len(ddim_timesteps(steps))`` (the official
            ``x0_forward_timesteps = int(steps·(1 − fidelity))``).
        noise: draws the q_sample noise (one draw shaped like ``x0``).

    The noising uses the official ``sqrt`` buffers in ``x0``'s dtype, as the official model does
    in float32 and (after ``net.half()``) in float16.

    Returns:
        ``(x_t, start_step)``: pass both to :func:`sample_ddim` (``x=x_t, start_step=start_step``).
    """
    timesteps = ddim_timesteps(steps)
    if not 1 <= k < timesteps.shape[0]:
        raise VDInputError(
            f"fidelity start: k = {k} DDIM steps must be between 1 and {timesteps.shape[0] - 1} for "
            f"{steps} steps (k = int(steps·(1 − fidelity)); fidelity 0 samples from pure noise)"
        )
    t = torch.full((x0.shape[0],), int(timesteps[k]), dtype=torch.long, device=x0.device)
    x_t = q_sample(x0, t, noise(x0))
    return x_t, timesteps.shape[0] - k


def sample_ddim(
    eps_model: EpsModel,
    x: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    noise: NoiseSource,
    alphas_cumprod: torch.Tensor | None = None,
    start_step: int = 0,
    callback: Callback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Run the official DDIM sampler (algorithm.md §7.2) from ``x``.

    Each step, with ``a_t, a_prev, sigma`` from :func:`ddim_schedule`::

        ε      = eps_model(x, t)
        x0_hat = (x − sqrt(1 − a_t)·ε) / sqrt(a_t)
        x      = sqrt(a_prev)·x0_hat + sqrt(1 − a_prev − sigma²)·ε + sigma·n,   n = noise(x)

    Args:
        eps_model: ``eps(x, t)`` with guidance applied (:class:`GuidedEps`); ``t`` is a ``(B,)``
            int64 tensor on ``x``'s device.
        x: ``(B, ...)`` starting sample in diffusion space: ``noise(shape)`` for a fresh run (the
            official initial latent), or the first output of :func:`ddim_noised_start`.
        steps: requested DDIM steps (S = 7 runs 8, see :func:`ddim_timesteps`).
        eta: η ∈ [0, 1].
        noise: draws the per-step noise; called at every step, even at η = 0.
        alphas_cumprod: ``(1000,)`` ᾱ; ``None`` is the official float32 schedule.
        start_step: number of leading (noisiest) timesteps skipped; the fidelity path's
            ``start_step`` comes from :func:`ddim_noised_start`.
        callback: ``callback(step, total, x, x0_hat)`` after every step.
        cancel: ``cancel() -> bool`` checked before every step; True raises ``Cancelled``.

    Returns:
        The final sample, shaped and typed like ``x``.
    """
    schedule = ddim_schedule(steps, eta, alphas_cumprod)
    n_timesteps = schedule.timesteps.shape[0]
    if not 0 <= start_step < n_timesteps:
        raise VDInputError(
            f"start_step must be between 0 and {n_timesteps - 1} for {steps} DDIM steps, got {start_step}"
        )
    total = n_timesteps - start_step
    logger.debug("DDIM: %d steps from t=%d, eta %s", total, int(schedule.timesteps[total - 1]), eta)

    # Like the official torch.full(..., dtype=x.dtype) tensors, every coefficient is cast to the
    # sample dtype and then combined on the sample's device; this happens once, before the loop,
    # so the loop never waits on the host.
    per_step = torch.stack(
        [schedule.sqrt_one_minus_alphas.to(x.dtype), schedule.alphas.to(x.dtype),
         schedule.alphas_prev.to(x.dtype), schedule.sigmas.to(x.dtype)]
    ).to(x.device)
    sqrt_one_minus_a_t, a_t, a_prev, sigma = per_step.unbind()
    coefficients = torch.stack(
        [sqrt_one_minus_a_t, a_t.sqrt(), (1.0 - a_prev - sigma**2).sqrt(), a_prev.sqrt(), sigma]
    )
    batch = x.shape[0]
    timesteps = schedule.timesteps.tolist()

    for step in range(total):
        raise_if_cancelled(cancel, step, total)
        index = total - 1 - step
        sqrt_one_minus_at, sqrt_at, dir_coef, sqrt_a_prev, sigma_t = coefficients[:, index].unbind()
        t = torch.full((batch,), timesteps[index], dtype=torch.long, device=x.device)
        eps = eps_model(x, t)
        x0_hat = (x - sqrt_one_minus_at * eps) / sqrt_at
        x = sqrt_a_prev * x0_hat + dir_coef * eps + sigma_t * noise(x)
        if callback is not None:
            callback(step, total, x, x0_hat)
    return x
