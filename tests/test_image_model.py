"""VD's image flows as a core MODEL on ComfyUI's own SD 1.x UNet (`nodes/image_model.py`), inside ComfyUI.

The native UNet's ε is compared with the official ε of every step of the release miniature's
10-step DDIM runs (``tiny_release/expected``), called the way ComfyUI's sampling calls it (cond and
uncond batched, or run separately when their token counts differ); then core KSampler on the same
MODEL, fp8 weight storage, and ComfyUI's own partial unloading.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import assert_close_ref, dual_ratios, guidance_of
from node_fixtures import RELEASE_FILES

LATENT_SCALE = 0.18215  # algorithm.md §6.1


@pytest.fixture(scope="module")
def modules(pack, release_models):
    return {name: importlib.import_module(f"vd_pack.nodes.{name}") for name in ("image_model", "conditioning")}


@pytest.fixture(scope="module")
def ddim_contexts(expected):
    return expected["ddim_contexts"]


def _guided(pack, kind, cond, uncond, ratio=1.0):
    return pack.vd_core.contexts.GuidedContext(kind, cond[:1], uncond[:1], ratio)


def _dual(pack, ddim_contexts, expected) -> dict:
    """The official dual-context case's two contexts with the ratios its description gives."""
    text_ratio, image_ratio = dual_ratios(expected["json"]["ddim"]["dual"]["description"])
    return {"text": _guided(pack, "text", ddim_contexts["dual_text_c"], ddim_contexts["text_u"], text_ratio),
            "image": _guided(pack, "image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"], image_ratio)}


def _model(modules, release_dir, kinds, weight_dtype="fp32"):
    return modules["image_model"].load_image_model(release_dir / RELEASE_FILES["diffuser"], kinds, weight_dtype)


def _eps(patcher, x, t, entries):
    """ε of the MODEL for CONDITIONING ``entries`` (each ``[tokens, extras]``), batched along the batch
    as ComfyUI's ``calc_cond_batch`` does: ``extra_conds`` turns each entry into model inputs."""
    model = patcher.model
    batch = x.shape[0]
    conds = [{key: value.process_cond(batch_size=batch, device=x.device)
              for key, value in model.extra_conds(cross_attn=tokens, **extras).items()} for tokens, extras in entries]
    inputs = {key: conds[0][key].concat([c[key] for c in conds[1:]]) for key in conds[0]}
    sigma = model.model_sampling.sigma(torch.full((batch * len(entries),), float(t)))
    xc = torch.cat([x] * len(entries)) * (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        denoised = model.apply_model(xc, sigma, **inputs)
    return (xc - denoised) / sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("case, kinds, order", [
    ("ddim_t2i", ("text",), ("text",)),
    ("ddim_i2i", ("image",), ("image",)),
    ("ddim_i2i", ("text", "image"), ("image",)),  # a context of the second kind alone
    ("ddim_dual", ("text", "image"), ("text", "image")),
    ("ddim_dual", ("text", "image"), ("image", "text")),
])
def test_native_unet_matches_official_eps(pack, modules, release_dir, ddim_contexts, expected, case, kinds, order):
    run = expected[case]
    contexts = {
        "ddim_t2i": {"text": _guided(pack, "text", ddim_contexts["t2i_c"], ddim_contexts["text_u"])},
        "ddim_i2i": {"image": _guided(pack, "image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"])},
        "ddim_dual": _dual(pack, ddim_contexts, expected),
    }[case]
    patcher = _model(modules, release_dir, kinds)
    positive, negative = modules["conditioning"].conditioning_pair([contexts[k] for k in order])
    for step in (0, len(run["timesteps"]) - 1):
        x = run["x_init"] if step == 0 else run["x_steps"][step - 1]
        t = run["timesteps"][step]
        eps_uncond, eps_cond = _eps(patcher, x, t, negative + positive).chunk(2)
        assert_close_ref(eps_uncond, run["eps_uncond"][step], 1e-4, f"{case} {order} step {step} uncond")
        assert_close_ref(eps_cond, run["eps_cond"][step], 1e-4, f"{case} {order} step {step} cond")


def test_model_refuses_other_conditioning_and_missing_kinds(pack, modules, release_dir, ddim_contexts):
    errors = pack.vd_core.errors
    patcher = _model(modules, release_dir, ("text",))
    tokens = ddim_contexts["t2i_c"][:1]
    with pytest.raises(errors.VDInputError, match="VD Context to Conditioning"):
        patcher.model.extra_conds(cross_attn=tokens)  # e.g. CLIP Text Encode: no VD keys
    image = _guided(pack, "image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"])
    ((tokens, extras),), _ = modules["conditioning"].conditioning_pair([image])
    with pytest.raises(errors.VDInputError, match="image_model to 'text\\+image'"):
        patcher.model.extra_conds(cross_attn=tokens, **extras)


def test_ksampler_on_the_model_reproduces_official_ddim(pack, modules, release_dir, ddim_contexts, expected):
    """Core KSampler (Advanced) with ddim/ddim_uniform on the loader's MODEL is DDIM in sigma space:
    from the official start latent it reaches the official final x0 estimate."""
    import nodes as comfy_nodes

    run = expected["ddim_dual"]
    dual = _dual(pack, ddim_contexts, expected)
    text, image = dual["text"], dual["image"]
    model = _model(modules, release_dir, ("text", "image"))
    positive, negative = modules["conditioning"].conditioning_pair((text, image))
    batches = []
    model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    sigma = model.model.model_sampling.sigma(run["timesteps"][0].float())
    start = {"samples": run["x_init"] * (1 + sigma**2) ** 0.5 / LATENT_SCALE}  # VD's x_t in ComfyUI's units
    steps = len(run["timesteps"])
    (out,) = comfy_nodes.KSamplerAdvanced().sample(
        model, "disable", 0, steps, guidance_of(expected["json"]["ddim"]["dual"], 7.5), "ddim", "ddim_uniform",
        positive, negative, start, 0, steps, "disable")
    batch = run["x_init"].shape[0]
    assert batches == [2 * batch] * steps  # cond and uncond in one call per step, as VD does
    assert_close_ref(out["samples"] * LATENT_SCALE, run["pred_x0"][-1], 1e-4, "KSampler ddim final x0")


def test_fp8_weight_storage(modules, release_dir, ddim_contexts, expected, pack):
    patcher = _model(modules, release_dir, ("text",), "fp8_e4m3fn")
    assert {p.dtype for p in patcher.model.diffusion_model.input_blocks.parameters()} == {torch.float8_e4m3fn}
    run = expected["ddim_t2i"]
    text = _guided(pack, "text", ddim_contexts["t2i_c"], ddim_contexts["text_u"])
    positive, negative = modules["conditioning"].conditioning_pair([text])
    eps = _eps(patcher, run["x_init"], run["timesteps"][0], positive)
    # 8-bit weights: close to the official ε, not equal (3 mantissa bits)
    err = (eps - run["eps_cond"][0]).abs().max() / run["eps_cond"][0].abs().max()
    assert 0 < err < 0.5 and torch.isfinite(eps).all()


def test_partial_unload_then_forward(modules, release_dir, ddim_contexts, expected, pack):
    """ComfyUI may unload part of the MODEL (another model needs the memory); the next run must load
    it back through ComfyUI rather than fail with weights on two devices."""
    import comfy.model_management as mm

    patcher = _model(modules, release_dir, ("text",))
    mm.load_models_gpu([patcher])
    patcher.partially_unload(patcher.offload_device, memory_to_free=patcher.model_size() // 2)
    mm.load_models_gpu([patcher])
    run = expected["ddim_t2i"]
    text = _guided(pack, "text", ddim_contexts["t2i_c"], ddim_contexts["text_u"])
    positive, _ = modules["conditioning"].conditioning_pair([text])
    assert_close_ref(_eps(patcher, run["x_init"], run["timesteps"][0], positive), run["eps_cond"][0], 1e-4, "after reload")
