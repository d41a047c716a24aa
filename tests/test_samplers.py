"""Samplers (algorithm.md §7): exact DDIM replay of the official trajectories, noise sources, guidance,
and the k-diffusion-style samplers on an analytic problem."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_close_ref, dual_ratios, guidance_of, load_tensors, reference_dir
from vd_core.diffuser import ContextInput
from vd_core.errors import Cancelled, VDInputError
from vd_core.samplers import (
    BatchNoise,
    GuidedEps,
    PerItemNoise,
    ddim_noised_start,
    ddim_schedule,
    ddim_timesteps,
    eps_model_to_denoiser,
    initial_latent,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sigma_range,
    sigmas_karras,
    sigmas_uniform,
)
from vd_core.schedule import alphas_cumprod, sigmas_from_alphas


@pytest.fixture(scope="module")
def ddim_cases(tiny_dir) -> dict:
    cases = json.loads((tiny_dir / "ddim.json").read_text())
    return {name: case for name, case in cases.items() if "steps" in case}


@pytest.fixture(scope="module")
def official_schedule(tiny_dir) -> dict:
    return load_tensors(tiny_dir / "schedule.safetensors")


class ReplayNoise:
    """A noise source that hands out recorded draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)
        self.calls = 0

    def __call__(self, like):
        n = self.draws[self.calls]
        assert n.shape == like.shape
        self.calls += 1
        return n.to(like.dtype)


class ReplayDiffuser:
    """Returns the recorded raw diffuser output of each step and records what it was given."""

    def __init__(self, case: dict):
        self.case = case
        self.calls = []

    def __call__(self, x, t, contexts):
        step = len(self.calls)
        self.calls.append((x, t, contexts))
        batch = self.case["x_init"].shape[0]
        assert torch.equal(t, self.case["timesteps"][step].repeat(x.shape[0]))
        if "eps" in self.case:
            assert x.shape[0] == batch
            return self.case["eps"][step]
        assert x.shape[0] == 2 * batch and torch.equal(x[:batch], x[batch:])
        return torch.cat([self.case["eps_uncond"][step], self.case["eps_cond"][step]])


# ------------------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("steps", [5, 7, 10, 50])
def test_ddim_timesteps_are_official(official_schedule, steps):
    assert torch.equal(ddim_timesteps(steps), official_schedule[f"ddim_timesteps_s{steps}"])


def test_ddim_seven_steps_run_eight(tiny_dir):
    recorded = json.loads((tiny_dir / "schedule.json").read_text())
    assert ddim_timesteps(7).tolist() == recorded["ddim_timesteps_7_requested"]
    assert ddim_timesteps(50).tolist() == recorded["ddim_timesteps_50"]
    seen = []
    sample_ddim(lambda x, t: torch.zeros_like(x), torch.zeros(1, 3), 7, noise=BatchNoise(0),
                callback=lambda i, total, x, x0: seen.append((i, total)))
    assert seen == [(i, 8) for i in range(8)]


@pytest.mark.parametrize("steps, count", [(3, 3), (9, 9), (27, 27), (37, 37), (111, 111), (333, 333),
                                          (501, 999), (1000, 999)])
def test_ddim_drops_the_timestep_past_the_schedule(steps, count):
    # The official sequence ends at t = 1000 for these counts (and crashes); ours stops at 999.
    timesteps = ddim_timesteps(steps)
    assert int(timesteps.max()) == 1000 - 1000 // steps and len(timesteps) == count
    out = sample_ddim(lambda x, t: torch.zeros_like(x), torch.ones(1, 3), steps, noise=BatchNoise(0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("steps", [5, 7, 10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_coefficients_are_the_official_values(tiny_dir, official_schedule, steps, eta):
    schedule = ddim_schedule(steps, eta)
    suffix = f"s{steps}_eta{str(eta).replace('.', 'p')}"
    for name, ours in [
        ("alphas", schedule.alphas),
        ("alphas_prev", schedule.alphas_prev),
        ("sigmas", schedule.sigmas),
        ("sqrt_one_minus_alphas", schedule.sqrt_one_minus_alphas),
    ]:
        assert torch.equal(ours.double(), official_schedule[f"ddim_{name}_{suffix}"]), name
    # ... held in the dtypes the official sampler holds them in (e.g. "ndarray/float64").
    recorded = json.loads((tiny_dir / "schedule.json").read_text())["sampler_attribute_types"][suffix]
    for name, ours in [("alphas", schedule.alphas), ("alphas_prev", schedule.alphas_prev),
                       ("sigmas", schedule.sigmas), ("sqrt_one_minus_alphas", schedule.sqrt_one_minus_alphas)]:
        assert str(ours.dtype).removeprefix("torch.") == recorded[f"ddim_{name}_type"].split(".")[-1].split("/")[-1]
    assert schedule.timesteps.shape == (recorded["n_timesteps"],)


def _guidance_scale(case_info: dict, tensors: dict, webui_scale: float) -> float:
    # README (ddim_<case>): the trajectories use the WebUI's CFG scale unless the description names
    # another; the case recorded without a CFG batch (a single "eps" per step) says "guidance scale 1".
    scale = guidance_of(case_info, webui_scale)
    assert ("eps" in tensors) == (scale == 1.0), case_info["description"]
    return scale


# Case names are needed at collection time; without the fixtures the list is empty (tests skip).
_DDIM_JSON = reference_dir() / "tiny" / "ddim.json"
CASES = sorted(n for n, c in json.loads(_DDIM_JSON.read_text()).items() if "steps" in c) if _DDIM_JSON.is_file() else []


def test_the_generator_cases_are_all_there(ddim_cases):
    # Every kind of flow the README lists is recorded (text→image, variation, fidelity, dual, text flows).
    assert {name.split("_")[0] for name in ddim_cases} == {"t2i", "i2i", "dual", "i2t", "t2t"}
    assert any("x0_forward_timesteps" in case for case in ddim_cases.values())


@pytest.mark.parametrize("name", CASES)
def test_ddim_replays_the_official_trajectory(tiny_dir, tiny_config, ddim_cases, name):
    info = ddim_cases[name]
    case = load_tensors(tiny_dir / f"ddim_{name}.safetensors")
    diffuser = ReplayDiffuser(case)
    batch = case["x_init"].shape[0]
    # Dual context is two context entries; the replayed outputs already contain their mixing.
    kinds = ["text", "image"] if name.startswith("dual") else ["text"]
    ratios = dual_ratios(info["description"]) if name.startswith("dual") else [1.0]
    cond = [ContextInput(k, torch.ones(1, 3, 5), r) for k, r in zip(kinds, ratios)]
    uncond = [ContextInput(k, torch.zeros(1, 3, 5)) for k in kinds]
    eps_model = GuidedEps(diffuser, cond, uncond, _guidance_scale(info, case, tiny_config["app"]["scale_imgto"]))

    start_step = 0
    x = case["x_init"]
    if "x0" in case:
        k = info["x0_forward_timesteps"]
        x, start_step = ddim_noised_start(case["x0"], info["steps"], k, ReplayNoise([case["q_sample_noise"]]))
        assert start_step == info["steps"] - k
        assert int(ddim_timesteps(info["steps"])[k]) == int(case["q_sample_t"][0])
        assert_close_ref(x, case["x_init"], rel=1e-6, what=f"{name} noised start")

    seen = []
    noise = ReplayNoise(case["step_noise"])
    result = sample_ddim(eps_model, x, info["steps"], eta=info["eta"], noise=noise, start_step=start_step,
                         callback=lambda i, total, x, x0: seen.append((i, total, x, x0)))

    n_steps = info["n_model_calls"]
    assert len(diffuser.calls) == n_steps and noise.calls == n_steps  # a draw at every step, even at eta 0
    assert [s[:2] for s in seen] == [(i, n_steps) for i in range(n_steps)]
    for i, (_, _, x_i, x0_i) in enumerate(seen):
        assert_close_ref(x_i, case["x_steps"][i], rel=1e-5, what=f"{name} x step {i}")
        assert_close_ref(x0_i, case["pred_x0"][i], rel=1e-5, what=f"{name} pred_x0 step {i}")
    assert_close_ref(result, case["x_final"], rel=1e-5, what=f"{name} x_final")
    # Classifier-free guidance batches [uncond; cond] with each context's own ratio.
    if eps_model.scale != 1.0:
        _, _, contexts = diffuser.calls[0]
        assert [(c.kind, c.ratio) for c in contexts] == [(c.kind, c.ratio) for c in cond]
        for c in contexts:
            assert torch.equal(c.tokens[:batch], torch.zeros(batch, 3, 5))
            assert torch.equal(c.tokens[batch:], torch.ones(batch, 3, 5))


def test_ddim_fp16_runs_in_the_sample_dtype(tiny_dir, tiny_config, ddim_cases):
    # The case with per-step noise mixed in (eta > 0) on the image flow, replayed in float16.
    name = next(n for n, c in sorted(ddim_cases.items()) if n.startswith("t2i") and c["eta"] > 0)
    info, case = ddim_cases[name], load_tensors(tiny_dir / f"ddim_{name}.safetensors")
    scale = _guidance_scale(info, case, tiny_config["app"]["scale_imgto"])
    eps = case["eps_uncond"] + scale * (case["eps_cond"] - case["eps_uncond"])
    replay = iter(eps)
    result = sample_ddim(lambda x, t: next(replay).half(), case["x_init"].half(), info["steps"], eta=info["eta"],
                         noise=ReplayNoise(case["step_noise"]), alphas_cumprod=alphas_cumprod(torch.float16))
    assert result.dtype == torch.float16
    # algorithm.md §9: fp16 moves short trajectories by 0.5–2 % relative (here: only the sampler's own
    # arithmetic is fp16, measured 0.16 %).
    assert_close_ref(result, case["x_final"], rel=5e-3, what="fp16 x_final")


def test_ddim_cancel_stops_between_steps():
    calls = []

    def eps_model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    with pytest.raises(Cancelled):
        sample_ddim(eps_model, torch.zeros(2, 4), 10, noise=BatchNoise(0), cancel=lambda: len(calls) >= 2)
    assert len(calls) == 2


@pytest.mark.parametrize("request_", [lambda: ddim_timesteps(0), lambda: ddim_timesteps(1001),
                                      lambda: ddim_schedule(10, eta=1.5),
                                      lambda: ddim_noised_start(torch.zeros(1, 4), 10, 10, BatchNoise(0)),
                                      lambda: ddim_noised_start(torch.zeros(1, 4), 10, 0, BatchNoise(0))])
def test_ddim_rejects_impossible_requests(request_):
    with pytest.raises(VDInputError):
        request_()


# ------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("name", CASES)
def test_batch_noise_reproduces_the_official_rng_order(tiny_dir, ddim_cases, name):
    info = ddim_cases[name]
    case = load_tensors(tiny_dir / f"ddim_{name}.safetensors")
    global_state = torch.get_rng_state()
    noise = BatchNoise(info["torch_seed"])
    # Fidelity: the q_sample noise comes first; otherwise the initial latent.
    first = case["q_sample_noise"] if "x0" in case else case["x_init"]
    assert torch.equal(noise(torch.empty_like(first)), first)
    for i, recorded in enumerate(case["step_noise"]):
        assert torch.equal(noise(torch.empty_like(recorded)), recorded), f"step {i}"
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is untouched


def test_batch_noise_equals_manual_seed_randn_in_any_dtype():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        expected = torch.randn(3, 4, 5)
    assert torch.equal(BatchNoise(1234)(torch.empty(3, 4, 5)), expected)
    half = BatchNoise(1234)(torch.empty(3, 4, 5, dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.equal(half, expected.half())


def test_per_item_noise_row_i_is_a_single_run_with_seed_i():
    seeds = [5, 17, 5]
    noise = PerItemNoise(seeds)
    like = torch.empty(3, 4, 2)
    draws = [noise(like), noise(like)]
    for i, seed in enumerate(seeds):
        single = BatchNoise(seed)
        for draw in draws:
            assert torch.equal(draw[i : i + 1], single(like[:1]))
    assert torch.equal(draws[0][0], draws[0][2]) and not torch.equal(draws[0][0], draws[0][1])
    with pytest.raises(VDInputError):
        noise(torch.empty(2, 4, 2))


# ------------------------------------------------------------------------------------- guidance


class LinearDiffuser:
    """eps = 2·x + t/1000 + ratio-weighted mean of the context tokens (per sample)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, contexts):
        self.calls.append((x, t, contexts))
        total = sum(c.ratio for c in contexts)
        ctx = sum(c.ratio / total * c.tokens.mean(dim=(1, 2)) for c in contexts)
        return 2 * x + (t.float() / 1000 + ctx).view(-1, 1)


def test_guided_eps_batches_uncond_first_and_applies_the_formula():
    diffuser = LinearDiffuser()
    c = [ContextInput("text", torch.full((1, 4, 3), 1.0), 0.3), ContextInput("image", torch.full((2, 6, 3), 5.0), 0.7)]
    u = [ContextInput("text", torch.full((1, 4, 3), -1.0)), ContextInput("image", torch.zeros(1, 6, 3))]
    eps = GuidedEps(diffuser, c, u, 7.5)
    x, t = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([11, 11])
    out = eps(x, t)

    assert len(diffuser.calls) == 1
    x_in, t_in, contexts = diffuser.calls[0]
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    assert [(k.kind, k.ratio, tuple(k.tokens.shape)) for k in contexts] == [
        ("text", 0.3, (4, 4, 3)), ("image", 0.7, (4, 6, 3))]
    assert torch.equal(contexts[0].tokens, torch.cat([torch.full((2, 4, 3), -1.0), torch.full((2, 4, 3), 1.0)]))
    assert torch.equal(contexts[1].tokens, torch.cat([torch.zeros(2, 6, 3), torch.full((2, 6, 3), 5.0)]))
    eps_u = 2 * x + 0.011 + (0.3 * -1.0 + 0.7 * 0.0)
    eps_c = 2 * x + 0.011 + (0.3 * 1.0 + 0.7 * 5.0)
    assert_close_ref(out, eps_u + 7.5 * (eps_c - eps_u), rel=1e-6, what="guided eps")

    eps(x, t)  # a second step reuses the doubled contexts built by the first
    assert all(a.tokens is b.tokens for a, b in zip(diffuser.calls[1][2], contexts))


def test_guided_eps_scale_one_runs_once_on_cond_without_copying():
    diffuser = LinearDiffuser()
    tokens = torch.full((1, 4, 3), 2.0)
    eps = GuidedEps(diffuser, [ContextInput("text", tokens, 1.0)], None, 1.0)
    x, t = torch.zeros(3, 5), torch.tensor([1, 1, 1])
    assert_close_ref(eps(x, t), torch.full((3, 5), 2.001), rel=1e-6, what="scale-1 eps")
    (x_in, t_in, contexts), = diffuser.calls
    assert x_in is x and t_in is t
    assert contexts[0].tokens.shape == (3, 4, 3)
    assert contexts[0].tokens.data_ptr() == tokens.data_ptr()  # expanded, not copied


def test_guided_eps_rejects_inconsistent_contexts():
    c = [ContextInput("text", torch.ones(1, 4, 3))]
    with pytest.raises(VDInputError):
        GuidedEps(LinearDiffuser(), c, None, 7.5)
    with pytest.raises(VDInputError):
        GuidedEps(LinearDiffuser(), c, [ContextInput("image", torch.ones(1, 4, 3))], 7.5)
    with pytest.raises(VDInputError):
        GuidedEps(LinearDiffuser(), c + c, c, 7.5)
    eps = GuidedEps(LinearDiffuser(), [ContextInput("text", torch.ones(2, 4, 3))], None, 1.0)
    with pytest.raises(VDInputError):
        eps(torch.zeros(3, 5), torch.ones(3))


# ------------------------------------------------------------------------------------- k-samplers
# Toy problem with a known answer: data x0 ~ N(MU, S²) elementwise. At noise level σ the exact
# denoiser is D(x, σ) = MU + S²/(S² + σ²)·(x − MU), and the probability-flow ODE maps x(σ_max) to
# x(0) = MU + S/sqrt(S² + σ_max²)·(x(σ_max) − MU).
MU, S = 0.7, 0.5


def exact_denoiser(x, sigma):
    s2 = sigma.view(-1, *([1] * (x.dim() - 1))).double() ** 2
    return (MU + S**2 / (S**2 + s2) * (x.double() - MU)).to(x.dtype)


def exact_ode_solution(x_start, sigma_max):
    return MU + S / math.sqrt(S**2 + sigma_max**2) * (x_start - MU)


def test_eps_model_to_denoiser_matches_the_exact_denoiser():
    """A VP ε-model that is exact for the toy data becomes the exact VE denoiser: this checks
    c_in = sqrt(ᾱ), the continuous t(σ) and x0 = x − σ·ε together."""
    log_sigmas = sigmas_from_alphas(alphas_cumprod()).double().log().numpy()
    t_seen = []

    def exact_eps(x_in, t):
        t_seen.append(t)
        sigma_t = np.exp(np.interp(t.double().numpy(), np.arange(1000), log_sigmas))
        a = torch.from_numpy(1 / np.sqrt(1 + sigma_t**2)).view(-1, 1)
        b = torch.from_numpy(sigma_t / np.sqrt(1 + sigma_t**2)).view(-1, 1)
        return (b * (x_in.double() - a * MU) / (a**2 * S**2 + b**2)).float()

    denoiser = eps_model_to_denoiser(exact_eps)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)) * 3
    for sigma in [14.6, 3.3, 0.81, 0.05]:
        sig = torch.full((4,), sigma)
        assert_close_ref(denoiser(x, sig), exact_denoiser(x, sig), rel=1e-4, what=f"D(x, {sigma})")
    assert t_seen[0].dtype == torch.float32 and t_seen[0].shape == (4,)
    assert 990 < t_seen[0][0] < 999 and t_seen[0][0] != t_seen[0][0].round()  # fractional timestep


def _ode_errors(steps: int) -> tuple[float, float]:
    sigma_min, sigma_max = sigma_range()
    sigmas = sigmas_karras(steps, sigma_min, sigma_max)
    x_start = initial_latent(BatchNoise(0)(torch.empty(64, 8, dtype=torch.float64)), sigmas)
    target = exact_ode_solution(x_start, float(sigmas[0]))
    err_euler = (sample_euler(exact_denoiser, x_start, sigmas) - target).abs().max().item()
    err_dpmpp = (sample_dpmpp_2m(exact_denoiser, x_start, sigmas) - target).abs().max().item()
    return err_euler, err_dpmpp


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_is_closer_to_the_exact_ode_than_euler(steps):
    err_euler, err_dpmpp = _ode_errors(steps)
    assert err_dpmpp < 0.5 * err_euler


def test_k_samplers_converge_to_the_exact_ode_solution():
    (euler_20, dpmpp_20), (euler_80, dpmpp_80) = _ode_errors(20), _ode_errors(80)
    assert euler_80 < 0.3 * euler_20  # first order: error ∝ 1/steps
    assert dpmpp_80 < 0.1 * dpmpp_20 and dpmpp_80 < 0.003


def test_euler_ancestral_samples_the_data_distribution():
    """Fresh noise at every step still ends on the data distribution N(MU, S²), more closely as
    the steps get finer (Euler ancestral is first order)."""
    sigma_min, sigma_max = sigma_range()
    std_errors = []
    for steps in [10, 30, 300]:
        sigmas = sigmas_karras(steps, sigma_min, sigma_max)
        noise = BatchNoise(1)
        x_start = initial_latent(noise(torch.empty(20000)), sigmas)
        x = sample_euler_ancestral(exact_denoiser, x_start, sigmas, noise=noise)
        assert x.mean().item() == pytest.approx(MU, abs=0.02)
        std_errors.append(abs(x.std().item() - S))
    assert std_errors[2] < std_errors[1] < std_errors[0]
    assert std_errors[2] < 0.015


def test_euler_ancestral_with_eta_zero_is_euler():
    sigmas = sigmas_karras(8, *sigma_range())
    x = initial_latent(BatchNoise(2)(torch.empty(3, 5)), sigmas)

    def no_noise(like):
        raise AssertionError("eta 0 draws no noise")

    assert torch.equal(sample_euler_ancestral(exact_denoiser, x, sigmas, eta=0.0, noise=no_noise),
                       sample_euler(exact_denoiser, x, sigmas))


K_SAMPLERS = [(sample_euler, {}), (sample_dpmpp_2m, {}), (sample_euler_ancestral, {"noise": BatchNoise(0)})]


@pytest.mark.parametrize("sampler, kwargs", K_SAMPLERS)
def test_k_samplers_end_on_a_single_point_distribution(sampler, kwargs):
    """Data that is one point: the denoiser is exact at every level and the last step lands on it."""
    point = torch.tensor([0.25, -1.5, 3.0])
    sigmas = sigmas_uniform(6)
    seen = []
    x = sampler(lambda x, sigma: point.expand_as(x), initial_latent(BatchNoise(3)(torch.empty(2, 3)), sigmas), sigmas,
                callback=lambda i, total, x, x0: seen.append((i, total)), **kwargs)
    assert_close_ref(x, point.expand(2, 3), rel=1e-6, what=f"{sampler.__name__} end point")
    assert seen == [(i, 6) for i in range(6)]


@pytest.mark.parametrize("sampler, kwargs", K_SAMPLERS)
def test_k_samplers_cancel(sampler, kwargs):
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)

    with pytest.raises(Cancelled):
        sampler(denoiser, torch.ones(1, 2), sigmas_uniform(5), cancel=lambda: len(calls) == 3, **kwargs)
    assert len(calls) == 3
