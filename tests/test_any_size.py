"""Any multiple of 8 px: latents whose sides the diffuser's downsamplings do not divide work in the
diffuser, a flow and the CLI, and sizes the official code accepts give exactly the official walk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import contexts_for
from vd_core import cli
from vd_core.diffuser.image_layers import Upsample
from vd_core.flows import SamplingOptions, text_to_image
from vd_core.models import load_models


def _factor(config) -> int:
    """How many times the walk halves the latent: the official code needs sides divisible by it."""
    return 2 ** (len(config.channel_mult) - 1)


def _odd_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Latent sizes near the fixture's that the downsamplings do not divide (one side, both)."""
    return [(h + 1, w), (h, w + 3), (h + 1, w + 1)]


def _official_upsample(self, x, size=None):
    """The official Upsample: nearest ×2, whatever the skip's size."""
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def test_divisible_latents_give_bitwise_the_official_walk(tiny_model, tiny_inputs, monkeypatch):
    x = tiny_inputs["x_image"]
    assert x.shape[2] % _factor(tiny_model.config) == 0 and x.shape[3] % _factor(tiny_model.config) == 0
    t = tiny_inputs["t_pair"]
    for spec in ([("text", 1.0)], [("image", 1.0)], [("text", 0.3), ("image", 0.7)]):
        contexts = contexts_for(spec, tiny_inputs)
        ours = tiny_model(x, t, contexts)
        with monkeypatch.context() as patch:
            patch.setattr(Upsample, "forward", _official_upsample)
            official = tiny_model(x, t, contexts)
        assert torch.equal(ours, official), spec


def test_odd_latents_run_through_the_diffuser(tiny_model, tiny_inputs):
    factor = _factor(tiny_model.config)
    if factor == 1:
        pytest.skip("this fixture's diffuser never downsamples")
    x0 = tiny_inputs["x_image"]
    t = tiny_inputs["t_pair"]
    generator = torch.Generator().manual_seed(0)
    for h, w in _odd_sizes(*x0.shape[2:]):
        assert h % factor or w % factor
        x = torch.randn(x0.shape[0], x0.shape[1], h, w, generator=generator)
        for spec in ([("text", 1.0)], [("text", 0.5), ("image", 0.5)]):
            eps = tiny_model(x, t, contexts_for(spec, tiny_inputs))
            assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_upsample_is_nearest_to_the_skip_size():
    """Output pixel (i, j) is input pixel (⌊i·h/H⌋, ⌊j·w/W⌋), as ComfyUI's UNet (nearest to size)."""
    layer = Upsample(4)
    torch.nn.init.dirac_(layer.conv.weight)  # identity convolution: the output is the interpolation
    torch.nn.init.zeros_(layer.conv.bias)
    x = torch.randn(1, 4, 3, 5)
    for size in [(5, 9), (6, 10), (6, 9)]:
        out = layer(x, size)
        rows = np.floor(np.arange(size[0]) * 3 / size[0]).astype(int)
        cols = np.floor(np.arange(size[1]) * 5 / size[1]).astype(int)
        assert torch.allclose(out, x[:, :, rows][:, :, :, cols], atol=1e-6), size


@pytest.fixture(scope="module")
def t2i_case(release_dir):
    case = json.loads((release_dir / "expected" / "ddim.json").read_text())["t2i"]
    prompts = json.loads((release_dir / "expected" / "clip.json").read_text())["prompts"]
    return case, prompts[0]


def test_odd_size_through_a_flow_and_the_cli(release_dir, t2i_case, tmp_path):
    case, prompt = t2i_case
    models = load_models(release_dir, flows=("text_to_image",))
    factor = _factor(models.diffuser.config)
    if factor == 1:
        pytest.skip("this fixture's diffuser never downsamples")
    h, w = _odd_sizes(*case["shape"][2:])[-1]
    width, height = 8 * w, 8 * h
    result = text_to_image(models, prompt, width=width, height=height, n=1,
                           options=SamplingOptions(steps=2, seed=case["torch_seed"]))
    assert result.images.shape == (1, 3, height, width) and result.latents.shape[2:] == (h, w)
    assert torch.isfinite(result.images).all()

    out = tmp_path / "odd.png"
    code = cli.main(["text-to-image", "--models", str(release_dir), "--prompt", prompt, "-n", "1", "--steps", "2",
                     "--width", str(width), "--height", str(height), "--out", str(out)])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (width, height)
