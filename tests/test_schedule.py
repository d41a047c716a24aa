"""The diffusion schedule (algorithm.md §2) against the official buffers in tiny/schedule.safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close_ref, load_tensors
from vd_core.errors import VDInputError
from vd_core.samplers import img2img_sigmas, initial_latent, sigma_range, sigmas_karras, sigmas_uniform
from vd_core.schedule import alphas_cumprod, q_sample, sigma_to_t, sigmas_from_alphas, t_to_sigma


@pytest.fixture(scope="module")
def official(tiny_dir) -> dict:
    return load_tensors(tiny_dir / "schedule.safetensors")


def test_alphas_cumprod_is_the_official_float32_buffer(official):
    ac = alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, official["alphas_cumprod"])
    # algorithm.md §2 quotes the two ends.
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert ac[999].item() == pytest.approx(0.0046601, rel=1e-4)


def test_alphas_cumprod_fp16_is_what_net_half_makes(official):
    assert torch.equal(alphas_cumprod(torch.float16), official["alphas_cumprod_fp16"])


def test_q_sample_uses_the_official_sqrt_buffers(official):
    t = torch.arange(1000)
    ones, zeros = torch.ones(1000, 1), torch.zeros(1000, 1)
    assert torch.equal(q_sample(ones, t, zeros)[:, 0], official["sqrt_alphas_cumprod"])
    assert torch.equal(q_sample(zeros, t, ones)[:, 0], official["sqrt_one_minus_alphas_cumprod"])
    # fp16: the float32 buffers rounded once more, as net.half() does.
    half = q_sample(ones.half(), t, zeros.half())[:, 0]
    assert half.dtype == torch.float16
    assert torch.equal(half, official["sqrt_alphas_cumprod"].half())


def test_q_sample_reproduces_the_fidelity_start(tiny_dir):
    case = load_tensors(tiny_dir / "ddim_i2i_fid0p4_s10.safetensors")
    x_t = q_sample(case["x0"], case["q_sample_t"], case["q_sample_noise"])
    assert_close_ref(x_t, case["x_init"], rel=1e-6, what="q_sample(x0, 601)")


def test_q_sample_with_an_explicit_schedule(official):
    t = torch.tensor([0, 500, 999])
    x0, n = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.ones(3, 4)
    got = q_sample(x0, t, n, official["alphas_cumprod"])
    a = official["alphas_cumprod"][t].double()[:, None]
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * n.double()
    assert_close_ref(got, expected, rel=1e-6, what="q_sample with alphas_cumprod")


def test_sigmas_from_alphas(official):
    sigmas = sigmas_from_alphas(official["alphas_cumprod"])
    ac = official["alphas_cumprod"].numpy().astype(np.float64)
    np.testing.assert_allclose(sigmas.numpy(), np.sqrt((1 - ac) / ac), rtol=1e-6)
    # The well-known SD 1.x range (k-diffusion / ComfyUI report the same numbers).
    assert sigmas[0].item() == pytest.approx(0.0291675, rel=1e-5)
    assert sigmas[-1].item() == pytest.approx(14.614642, rel=1e-6)
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    assert sigmas_from_alphas(official["alphas_cumprod_fp16"]).dtype == torch.float32


def test_sigma_to_t_interpolates_log_sigma(official):
    log_sigmas = sigmas_from_alphas(official["alphas_cumprod"]).double().log()
    # At the table's own sigmas the timesteps come back as integers.
    t_int = sigma_to_t(log_sigmas.exp(), log_sigmas)
    np.testing.assert_allclose(t_int.numpy(), np.arange(1000), atol=1e-8)
    # In between: independent piecewise-linear interpolation with numpy.
    rng = np.random.default_rng(0)
    log_sigma = rng.uniform(log_sigmas[0].item(), log_sigmas[-1].item(), size=(5, 7))
    expected = np.interp(log_sigma, log_sigmas.numpy(), np.arange(1000, dtype=np.float64))
    got = sigma_to_t(torch.from_numpy(log_sigma).exp(), log_sigmas)
    assert got.shape == (5, 7)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    # Outside the table the timestep is clamped.
    outside = sigma_to_t(torch.tensor([1e-4, 100.0], dtype=torch.float64), log_sigmas)
    assert outside.tolist() == [0.0, 999.0]


def test_t_to_sigma_is_the_inverse(official):
    log_sigmas = sigmas_from_alphas(official["alphas_cumprod"]).double().log()
    t = torch.tensor([0.0, 1.0, 1.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    sigma = t_to_sigma(t, log_sigmas)
    expected = np.exp(np.interp(t.numpy(), np.arange(1000), log_sigmas.numpy()))
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sigma_to_t(sigma, log_sigmas).numpy(), t.numpy(), atol=1e-9)


def test_sampler_sigma_lists():
    """The noise-level lists the k-samplers run: Karras spacing, uniform in t, img2img tails."""
    sigma_min, sigma_max = sigma_range()
    karras = sigmas_karras(10, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, 10)
    expected = (sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    np.testing.assert_allclose(karras.numpy(), np.append(expected, 0.0), rtol=1e-6)

    uniform = sigmas_uniform(10)
    table = sigmas_from_alphas(alphas_cumprod()).double()
    assert uniform.shape == (11,) and uniform[-1] == 0
    assert uniform[0].item() == pytest.approx(table[999].item(), rel=1e-6)
    assert uniform[-2].item() == pytest.approx(table[0].item(), rel=1e-6)
    t = np.linspace(999, 0, 10)
    expected = np.exp(np.interp(t, np.arange(1000), table.log().numpy()))
    np.testing.assert_allclose(uniform[:-1].numpy(), expected, rtol=1e-6)

    assert torch.equal(img2img_sigmas(karras, 1.0), karras)
    assert torch.equal(img2img_sigmas(karras, 0.5), karras[5:])
    assert img2img_sigmas(karras, 0.0).tolist() == [0.0]
    with pytest.raises(VDInputError):
        img2img_sigmas(karras, 1.5)
    n = torch.ones(2, 3)
    assert torch.equal(initial_latent(n, karras), n * karras[0])
    assert torch.equal(initial_latent(n, karras[5:], x0=torch.full((2, 3), 2.0)), 2.0 + n * karras[5])
