"""Flow details the official trajectories do not reach: the I2T2I stages (algorithm.md §10), negative prompts,
and the WebUI's bilinear mask resize (algorithm.md §8). Run on the release-layout miniature."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_ref, load_tensors
from vd_core.contexts import GuidedContext
from vd_core.flows import SamplingOptions, edit_image_with_text, sample_image, text_to_image
from vd_core.flows.context_builders import text_context
from vd_core.flows.image_prep import resize_masks
from vd_core.image_vae import LATENT_SCALE

i2t2i_module = importlib.import_module("vd_core.flows.edit_image_with_text")  # the package re-exports the function
REL = 1e-4  # README: single forward passes within 1e-4·max(1, max|ref|)
# algorithm.md §10 step 6–7, the legacy I2T2I script's constants: rank-10 local tokens, image 0.33 / text 0.67.
I2T2I_RANK, I2T2I_IMAGE_RATIO, I2T2I_TEXT_RATIO = 10, 0.33, 0.67


@pytest.fixture(scope="module")
def clip_ref(release_dir) -> dict:
    folder = release_dir / "expected"
    return {**load_tensors(folder / "clip.safetensors"), **json.loads((folder / "clip.json").read_text())}


def png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


def rank_k(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Reference for algorithm.md §10 step 6: per-token mean removed, exact rank-k SVD, mean added back."""
    x = tokens.double()
    mean = x.mean(-1, keepdim=True)
    u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :] + mean


# ------------------------------------------------------------------------------------ I2T2I


def test_i2t2i_edits_latents_and_builds_the_legacy_contexts(models, release_dir, monkeypatch):
    """Every I2T2I stage seen from outside: the sampled text latents lose their component along the
    negative prompt's Optimus latent and gain the positive one; the image stage gets the rank-10
    local tokens (image 0.33) and the sentences + positive prompt (text 0.67)."""
    seen = {}
    real_sample_text, real_decode, real_sample_image = (i2t2i_module.sample_text, i2t2i_module.decode_texts,
                                                         i2t2i_module.sample_image)

    def sample_text(*args, **kwargs):
        seen["sampled"] = real_sample_text(*args, **kwargs)
        return seen["sampled"]

    def decode_texts(optimus, latents, noise, **kwargs):
        seen["edited"] = latents
        seen["sentences"] = real_decode(optimus, latents, noise, **kwargs)
        return seen["sentences"]

    def sample_image(diffuser, contexts, **kwargs):
        seen["contexts"] = contexts
        return real_sample_image(diffuser, contexts, **kwargs)

    monkeypatch.setattr(i2t2i_module, "sample_text", sample_text)
    monkeypatch.setattr(i2t2i_module, "decode_texts", decode_texts)
    monkeypatch.setattr(i2t2i_module, "sample_image", sample_image)
    image = png(release_dir / "expected" / "image_0.png")
    height, width = image.shape[-2:]
    positive, negative = "a tall castle", "a white house"
    edit_image_with_text(models, image, positive, negative, n=2, width=width, height=height, color_adjust="none",
                         options=SamplingOptions(steps=2, seed=3))

    # Stage 2: z − (z·n̂)n̂ + p, checked through its two defining projections.
    z, edited = seen["sampled"], seen["edited"]
    n_latent, p_latent = models.optimus.encode([negative])[0], models.optimus.encode([positive])[0]
    direction = n_latent / n_latent.norm()
    assert_close_ref(edited @ direction, (p_latent @ direction).expand(2), 1e-5, "component along the negative")
    residual = (edited - p_latent) - ((edited - p_latent) @ direction)[:, None] * direction
    assert_close_ref(residual, z - (z @ direction)[:, None] * direction, 1e-5, "the rest of the sampled latent")

    # Stages 5–7: the contexts of the image sampling.
    image_ctx, text_ctx = seen["contexts"]
    assert (image_ctx.kind, text_ctx.kind) == ("image", "text")
    assert (image_ctx.ratio, text_ctx.ratio) == pytest.approx((I2T2I_IMAGE_RATIO, I2T2I_TEXT_RATIO))
    local = models.clip.encode_image(image)[:, 1:]  # focus 0.5: the plain CLIP context, global token dropped
    assert_close_ref(image_ctx.cond, rank_k(local, I2T2I_RANK).float(), 1e-4, "rank-10 local tokens")
    black = models.clip.encode_image(torch.zeros_like(image))[:, 1:]
    assert_close_ref(image_ctx.uncond, black, 1e-5, "black-image local tokens")
    expected_text = torch.cat([models.clip.encode_text(seen["sentences"]),
                               models.clip.encode_text([positive]).expand(2, -1, -1)], dim=1)
    assert_close_ref(text_ctx.cond, expected_text, 1e-5, "sentences + positive prompt")
    empty = models.clip.encode_text([""])
    assert_close_ref(text_ctx.uncond, torch.cat([empty, empty], dim=1), 1e-5, "two empty prompts")


# -------------------------------------------------------------------------------- negative prompts


def test_negative_prompt_is_the_unconditional_context(models, clip_ref):
    """text_context(prompt, negative): cond = CLIP(prompt), uncond = CLIP(negative), both official."""
    prompts = clip_ref["prompts"]
    context = text_context(models.clip, prompts[0], prompts[1])
    assert_close_ref(context.cond, clip_ref["text_ctx"][:1], REL, "cond")
    assert_close_ref(context.uncond, clip_ref["text_ctx"][1:2], REL, "uncond = the negative prompt")
    assert_close_ref(text_context(models.clip, prompts[0]).uncond, clip_ref["text_ctx_empty"], REL, "default \"\"")


def test_text_to_image_samples_against_the_negative_prompt(models, clip_ref, release_dir):
    """The flow's guidance contrasts the prompt with the negative prompt (official contexts here)."""
    _, _, h, w = json.loads((release_dir / "expected" / "ddim.json").read_text())["t2i"]["shape"]
    prompts, size = clip_ref["prompts"], {"width": 8 * w, "height": 8 * h}  # the fixture's text→image size
    options = SamplingOptions(steps=3, seed=4)
    result = text_to_image(models, prompts[0], negative=prompts[1], n=1, options=options, **size)
    reference = [GuidedContext("text", clip_ref["text_ctx"][:1], clip_ref["text_ctx"][1:2])]
    expected = sample_image(models.diffuser, reference, n=1, options=options, **size)
    assert_close_ref(result.latents * LATENT_SCALE, expected * LATENT_SCALE, 1e-3, "negative prompt honoured")
    plain = text_to_image(models, prompts[0], n=1, options=options, **size)
    assert (plain.latents - result.latents).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- masks


def test_masks_are_resized_bilinearly():
    """PIL bilinear is a triangle filter, widened by the scale when shrinking. Up ×2, [1, 0] gives
    output centres at input positions −0.25, 0.25, 0.75, 1.25 (edges clamped): [1, 0.75, 0.25, 0].
    Down ×2, [1, 1, 0, 0]: output pixel 0 weighs inputs 0, 1, 2 by 0.75, 0.75, 0.25: 1.5/1.75 = 6/7.
    (Nearest gives 0/1 only; bicubic, Lanczos and Hamming give other values.)"""
    up = resize_masks(torch.tensor([[[[1.0, 0.0]]]]), width=4, height=1)
    assert torch.allclose(up, torch.tensor([[[[1.0, 0.75, 0.25, 0.0]]]]), atol=1e-6)
    down = resize_masks(torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]]), width=2, height=1)
    assert torch.allclose(down, torch.tensor([[[[6 / 7, 1 / 7]]]]), atol=1e-6)
    square = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize_masks(square, 16, 16), square)  # same size: untouched
