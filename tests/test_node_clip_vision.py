"""VD CLIP Image Context fed by a core ``CLIP_VISION`` (ComfyUI's Load CLIP Vision) instead of the VD
CLIP: the context must be the official image context of the release fixture, not just its shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close_ref, release_config
from node_fixtures import comfy_image, first_context

REL = 1e-4  # README: single forward passes within 1e-4·max(1, max|ref|)


class CoreClipVision:
    """What the node uses of ``comfy.clip_vision.ClipVisionModel``: ``get_sd()`` and, as ComfyUI
    builds it from its json config, the head count on its attention layers."""

    def __init__(self, state_dict: dict, heads: int | None):
        self._sd = state_dict
        if heads is not None:
            layer = SimpleNamespace(self_attn=SimpleNamespace(heads=heads))
            self.model = SimpleNamespace(vision_model=SimpleNamespace(encoder=SimpleNamespace(layers=[layer])))

    def get_sd(self):
        return self._sd


@pytest.fixture(scope="module")
def vision_weights(release_dir) -> dict:
    weights = load_file(str(release_dir / "clip-vit-large-patch14" / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith(("vision_model.", "visual_projection."))}


def test_image_context_from_core_clip_vision_is_the_official_context(nodes, expected, release_dir, vision_weights):
    heads = release_config(release_dir)["ctx"]["clip_vision_config"]["num_attention_heads"]
    for i in range(expected["clip"]["image_ctx"].shape[0]):
        image = comfy_image(release_dir / "expected" / f"image_{i}.png")
        with torch.inference_mode():
            clip_vision = CoreClipVision(vision_weights, heads)
            (output,) = nodes["VDCLIPImageContext"].encode(image, 0.5, 1.0, clip_vision=clip_vision)
        context = first_context((output,))
        assert context.kind == "image"
        assert_close_ref(context.cond, expected["clip"]["image_ctx"][i : i + 1], REL, f"image_{i} via CLIP_VISION")
        assert torch.count_nonzero(context.uncond) == 0  # image variation's unconditional context: zeros


def test_heads_of_a_core_clip_vision_are_used(nodes, expected, release_dir, vision_weights):
    """Without the model's head count the node falls back to 64-wide heads (ViT-L/14's): on the
    miniature, whose heads are not 64 wide, that must give another context."""
    vision = release_config(release_dir)["ctx"]["clip_vision_config"]
    if vision["hidden_size"] // vision["num_attention_heads"] == 64:
        pytest.skip("this fixture's CLIP vision heads are 64 wide: the fallback is right")
    image = comfy_image(release_dir / "expected" / "image_0.png")
    with torch.inference_mode():
        clip_vision = CoreClipVision(vision_weights, None)
        (output,) = nodes["VDCLIPImageContext"].encode(image, 0.5, 1.0, clip_vision=clip_vision)
    error = (first_context((output,)).cond - expected["clip"]["image_ctx"][:1]).abs().max().item()
    assert error > 1e-3
