"""End-to-end parity with the official sampler and WebUI on the tiny model (algorithm.md §7, §8).

* ``tiny/ddim_*.safetensors``: every official DDIM trajectory, replayed with the real tiny diffuser
  through ``vd_core.flows.sampling`` (contexts from ``ddim_contexts.safetensors``, noise from a
  ``BatchNoise`` seeded like the fixture), compared step by step.
* ``tiny/app.json`` / ``app.safetensors``: the WebUI methods themselves (50 DDIM steps, user seeds),
  run through the public flow functions. The tiny CLIP takes token ids, so its tokenizer is a stub
  built from ``app.json["token_table"]``.

Tolerances are the fixture README's: ``x_final`` within ``1e-3·max|ref|`` (image flows) and
``1e-2·max|ref|`` (text flows), also for the 50-step WebUI latents (the README measured 50-step
thread-count differences of 3e-5 relative). Measured here (float32, CPU): 10-step image
trajectories ≤ 5e-6 relative, text ≤ 1.5e-5; WebUI image latents ≤ 2.1e-6, i2t 3.2e-5, t2t 2e-6.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_close_ref, dual_ratios, guidance_of, load_tensors, optimus_heads, reference_dir
from vd_core.clip import load_clip
from vd_core.contexts import GuidedContext
from vd_core.diffuser import load_diffuser
from vd_core.flows import (
    ImageSlot,
    SamplingOptions,
    dual_context,
    image_to_text,
    image_variation,
    multi_context,
    sample_image,
    sample_text,
    text_to_image,
    text_variation,
)
from vd_core.flows.result import decode_texts
from vd_core.image_vae import LATENT_SCALE, load_image_vae
from vd_core.models import VDModels
from vd_core.optimus import load_optimus
from vd_core.samplers import BatchNoise

IMAGE_TOL, TEXT_TOL = 1e-3, 1e-2


class TokenTableTokenizer:
    """The fixture's CLIP tokenizer stand-in: prompts → the recorded 77 ids (``app.json``)."""

    def __init__(self, table: dict, eos_id: int):
        self.table = table
        self.eos_token_id = self.pad_token_id = eos_id

    def __call__(self, prompts, **kwargs):
        return {"input_ids": [list(self.table[p]) for p in prompts]}


@pytest.fixture(scope="module")
def tiny_models(tiny_dir, tiny_config, release_dir) -> VDModels:
    weights = tiny_dir / "weights.safetensors"
    ctx = tiny_config["ctx"]
    table = json.loads((tiny_dir / "app.json").read_text())["token_table"]
    clip = load_clip(
        weights,
        tokenizer=TokenTableTokenizer(table, ctx["tiny_eos_id"]),
        config={"text_config": ctx["clip_text_config"], "vision_config": ctx["clip_vision_config"]},
    )
    return VDModels(
        diffuser=load_diffuser(weights, num_heads=tiny_config["diffuser_image"]["num_heads"]),
        clip=clip,
        image_vae=load_image_vae(weights),
        optimus=load_optimus(
            weights,
            tokenizer_dir=release_dir / "optimus_tokenizers",  # the real vocabularies the tiny model uses
            **optimus_heads(tiny_config),
        ),
    )


@pytest.fixture(scope="module")
def ddim_contexts(tiny_dir) -> dict:
    return load_tensors(tiny_dir / "ddim_contexts.safetensors")


# Case names are needed at collection time; without the fixtures the list is empty and the
# fixture-based tests below skip.
_DDIM_JSON = reference_dir() / "tiny" / "ddim.json"
DDIM_CASES = json.loads(_DDIM_JSON.read_text()) if _DDIM_JSON.is_file() else {}
CASE_NAMES = sorted(name for name, case in DDIM_CASES.items() if "steps" in case)
_CONFIG_JSON = reference_dir() / "tiny" / "config.json"
# The generator's DDIM cases use the WebUI's guidance unless their description says otherwise.
DEFAULT_SCALE = json.loads(_CONFIG_JSON.read_text())["tiny"]["app"]["scale_imgto"] if _CONFIG_JSON.is_file() else None


def case_contexts(name: str, c: dict) -> tuple[str, list[GuidedContext]]:
    """The data kind and guided contexts of one official DDIM case (``ddim.json`` descriptions)."""
    zeros = torch.zeros_like(c["image_c"])
    if name.startswith("dual"):
        text_ratio, image_ratio = dual_ratios(DDIM_CASES[name]["description"])
    if name.startswith("t2i") or name.startswith("t2t"):
        contexts = [GuidedContext("text", c["text_c"], c["text_u"])]
    elif name.startswith("i2i"):
        contexts = [GuidedContext("image", c["image_c"], zeros)]
    elif name.startswith("i2t"):
        contexts = [GuidedContext("image", c["image_c"], zeros, text_flow_uncond=c["image_u_black"])]
    else:  # dual: the text and image ratios its description gives
        contexts = [GuidedContext("text", c["text_c"], c["text_u"], text_ratio),
                    GuidedContext("image", c["image_c"], zeros, image_ratio)]
    return ("text" if "2t" in name else "image"), contexts


class Recorder:
    """Sampler callback keeping x and the x0 estimate of every step."""

    def __init__(self):
        self.x, self.x0 = [], []

    def __call__(self, step, total, x, x0):
        self.x.append(x.clone())
        self.x0.append(x0.clone())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_ddim_trajectory(name, tiny_dir, tiny_models, ddim_contexts):
    case = DDIM_CASES[name]
    ref = load_tensors(tiny_dir / f"ddim_{name}.safetensors")
    kind, contexts = case_contexts(name, ddim_contexts)
    record = Recorder()
    options = SamplingOptions(
        steps=case["steps"], eta=case["eta"], guidance=guidance_of(case, DEFAULT_SCALE), callback=record
    )
    noise = BatchNoise(case["torch_seed"])
    n = case["shape"][0]
    if kind == "image":
        h, w = case["shape"][2:]
        init = ref["x0"] / LATENT_SCALE if "x0" in ref else None
        denoise = case["x0_forward_timesteps"] / case["steps"] if init is not None else 1.0
        out = sample_image(tiny_models.diffuser, contexts, width=8 * w, height=8 * h, n=n, options=options,
                           init_latent=init, denoise=denoise, noise=noise) * LATENT_SCALE
        tol = IMAGE_TOL
    else:
        out = sample_text(tiny_models.diffuser, contexts, n=n, options=options, noise=noise)
        tol = TEXT_TOL
    assert len(record.x) == ref["x_steps"].shape[0] == case["n_model_calls"]
    bound = tol * ref["x_final"].abs().max().item()
    steps_err = max((x - r).abs().max().item() for x, r in zip(record.x, ref["x_steps"]))
    x0_err = max((x0 - r).abs().max().item() for x0, r in zip(record.x0, ref["pred_x0"]))
    assert steps_err <= bound, f"{name}: x after a step off by {steps_err:.3e} > {bound:.3e}"
    assert x0_err <= 10 * bound, f"{name}: x0 estimates off by {x0_err:.3e}"  # ÷sqrt(ᾱ) amplifies late errors
    assert_close_ref(out, ref["x_final"], tol, f"{name} x_final")


@pytest.mark.parametrize("name", ["i2t_s10", "t2t_s10"])
def test_ddim_text_decode_continues_the_generator(name, tiny_dir, tiny_models, ddim_contexts):
    """The official Optimus decode right after sampling draws from the same RNG (algorithm.md §7.4)."""
    case = DDIM_CASES[name]
    _, contexts = case_contexts(name, ddim_contexts)
    noise = BatchNoise(case["torch_seed"])
    options = SamplingOptions(steps=case["steps"], eta=case["eta"], guidance=guidance_of(case, DEFAULT_SCALE))
    latents = sample_text(tiny_models.diffuser, contexts, n=case["shape"][0], options=options, noise=noise)
    expected = DDIM_CASES["decoded_text"][name]
    assert decode_texts(tiny_models.optimus, latents, noise, clean_up=False) == expected["raw"]


# ---------------------------------------------------------------------------------------------
# The WebUI methods (tiny/app.json) at the WebUI values of config.json["tiny"]["app"]: output size,
# steps, guidance, images / texts per call; the user seeds of app.json.


class WebUI:
    """The fixture's WebUI calls: ``flows`` (app.json), ``tensors`` (app.safetensors), ``settings``."""

    def __init__(self, tiny_dir, tiny_inputs, settings: dict):
        self.flows = json.loads((tiny_dir / "app.json").read_text())["flows"]
        self.tensors = load_tensors(tiny_dir / "app.safetensors")
        self.settings = settings
        self.height, self.width = settings["output_dim"]  # the WebUI's `h, w = self.output_dim`
        self.n_images, self.n_texts = settings["n_sample_image"], settings["n_sample_text"]
        self._inputs = tiny_inputs

    def image(self, name: str) -> torch.Tensor:
        """``"inputs.app_img0_u8"`` (H, W, 3) uint8 → (1, 3, H, W) in [0, 1]."""
        return self._inputs[name.split(".", 1)[1]].permute(2, 0, 1)[None].float() / 255

    def size(self) -> dict:
        return {"width": self.width, "height": self.height}

    def options(self, flow: dict, text_share: float = 0.0, callback=None) -> SamplingOptions:
        """The call's settings; guidance ``scale_imgto·(1−τ) + scale_textto·τ`` as the WebUI computes it
        (τ = 1 for a text context, 0 for an image context, the text strength when mixed)."""
        scale = self.settings["scale_imgto"] * (1 - text_share) + self.settings["scale_textto"] * text_share
        return SamplingOptions(steps=flow.get("ddim_steps", self.settings["ddim_steps"]), eta=self.settings["ddim_eta"],
                               guidance=scale, seed=flow["args"][-1], callback=callback)


@pytest.fixture(scope="module")
def app(tiny_dir, tiny_inputs, tiny_config) -> WebUI:
    return WebUI(tiny_dir, tiny_inputs, tiny_config["app"])


def check_webui_images(result, tensors, key):
    """Latents within the image tolerance; the WebUI's images are ``trunc(255·x)``, so ours·255
    must lie in ``[u8, u8 + 1]`` up to a small margin (measured: within 1e-3 of a level)."""
    assert_close_ref(result.latents * LATENT_SCALE, tensors[f"{key}/x_final"], IMAGE_TOL, f"{key} x_final")
    offset = result.images.permute(0, 2, 3, 1) * 255 - tensors[f"{key}/images_u8"].float()
    assert offset.min() >= -0.02 and offset.max() <= 1.02, f"{key}: images off by [{offset.min()}, {offset.max()}] levels"


def test_webui_text_to_image(tiny_models, app):
    flow = app.flows["t2i"]
    result = text_to_image(tiny_models, flow["args"][0], n=app.n_images, options=app.options(flow, 1.0), **app.size())
    check_webui_images(result, app.tensors, "t2i")
    assert_close_ref(result.images, app.tensors["t2i/vae_decode"], 1e-4, "t2i images")  # measured 2.6e-6


@pytest.mark.parametrize("key", ["i2i_default", "i2i_semantic_simplecolor", "i2i_fid0p5_style", "i2i_fid1"])
def test_webui_image_variation(key, tiny_models, app):
    flow = app.flows[key]
    picture, fidelity, focus, color, _ = flow["args"]
    result = image_variation(tiny_models, app.image(picture), n=app.n_images, fidelity=fidelity, focus=focus,
                             color_adjust=color, options=app.options(flow), **app.size())
    if key == "i2i_fid1":  # the WebUI returns the (resized) input itself
        expected = app.tensors[f"{key}/images_u8"]
        assert torch.equal((result.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8), expected)
        return
    check_webui_images(result, app.tensors, key)


@pytest.mark.parametrize("key", ["i2t", "t2t"])
def test_webui_text_flows(key, tiny_models, app):
    flow = app.flows[key]
    record = Recorder()
    if key == "i2t":
        options = app.options(flow, 0.0, record)
        texts = image_to_text(tiny_models, app.image(flow["args"][0]), n=app.n_texts, options=options)
    else:
        options = app.options(flow, 1.0, record)
        texts = text_variation(tiny_models, flow["args"][0], n=app.n_texts, options=options)
    assert_close_ref(record.x[-1], app.tensors[f"{key}/x_final"], TEXT_TOL, f"{key} x_final")
    # The sampled tokens continue the run's generator: with float32 logits this close the
    # multinomial draws come out identical, so the WebUI's strings are reproduced exactly.
    assert texts == flow["output"].split("\n")


def test_webui_dual_context(tiny_models, app):
    for key in ("dcg", "dcg_textstrength0"):
        flow = app.flows[key]
        picture, focus, prompt, strength, _ = flow["args"]
        result = dual_context(tiny_models, prompt, app.image(picture), text_strength=strength, focus=focus,
                              n=app.n_images, options=app.options(flow, strength if prompt else 0.0), **app.size())
        check_webui_images(result, app.tensors, key)


def slots_from_webui(args: list, image) -> list[ImageSlot]:
    """The WebUI's 5-value image slots (image, sketch, weight, focus, use mask) → ``ImageSlot``s."""
    slots = []
    for i in range(0, len(args) - 3, 5):
        picture, sketch, weight, focus, use_mask = args[i : i + 5]
        if picture is None and sketch is None:
            continue
        if use_mask:  # the sketch layer's first channel, drawn (white) = removed (algorithm.md §8)
            mask = 1 - image(sketch["mask"])[:, :1]
            slots.append(ImageSlot(image(sketch["image"]), mask, weight, focus))
        else:
            slots.append(ImageSlot(image(picture), None, weight, focus))
    return slots


@pytest.mark.parametrize("key", ["tcg_masked", "mcg_three_images"])
def test_webui_multi_context(key, tiny_models, app):
    flow = app.flows[key]
    args = flow["args"]
    if key == "tcg_masked":  # Triple-Context = Multi-Context with slots 3–4 empty
        args = args[:10] + [None, None, None, None, None] * 2 + args[10:]
    prompt, strength = args[-3], args[-2]
    result = multi_context(tiny_models, prompt, slots_from_webui(args, app.image), text_strength=strength,
                           n=app.n_images, options=app.options(flow, strength if prompt else 0.0), **app.size())
    check_webui_images(result, app.tensors, key)
