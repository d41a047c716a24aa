"""Every value a user gives gets a result or a clear error (issue 12): non-finite numbers at the
boundaries and in results, images outside [0, 1], seeds over ComfyUI's whole range, text latents,
Optimus input, devices, shared models across dtypes, and runs that cannot fit in memory."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_ref, load_tensors
from vd_core import memory_budget, validation
from vd_core.contexts import GuidedContext
from vd_core.errors import NumericalError, VDInputError
from vd_core.flows import ImageSlot, SamplingOptions, image_variation, mix_contexts, multi_context, sample_image
from vd_core.flows.image_prep import resize_images, resize_masks
from vd_core.image_io import pil_to_tensor, read_image_file, read_mask_file

MAX_SEED = 2**64 - 1  # ComfyUI's seed widget maximum (0xffffffffffffffff)


@pytest.fixture(scope="module")
def case(release_dir) -> dict:
    """The t2i fixture case: its latent shape gives the sizes used here, its contexts the prompt."""
    folder = release_dir / "expected"
    t2i = json.loads((folder / "ddim.json").read_text())["t2i"]
    c = load_tensors(folder / "ddim_contexts.safetensors")
    n, _, h, w = t2i["shape"]
    return {"n": n, "width": 8 * w, "height": 8 * h, "seed": t2i["torch_seed"],
            "contexts": [GuidedContext("text", c["t2i_c"][:1], c["text_u"][:1])]}


def sample(models, case, contexts=None, diffuser=None, n=None, **options):
    options = {"steps": 2, "seed": case["seed"], **options}
    return sample_image(diffuser or models.diffuser, contexts or case["contexts"], width=case["width"],
                        height=case["height"], n=n or case["n"], options=SamplingOptions(**options))


# ---------------------------------------------------------------------------------------------
# Seeds: the whole range 0 … 2**64 − 1, one wrap rule.


@pytest.mark.parametrize("per_item", [False, True])
def test_seeds_over_the_whole_comfyui_range(models, case, per_item):
    for seed in (0, 2**63, MAX_SEED - 50, MAX_SEED):  # + 100 and + i used to overflow a long long
        out = sample(models, case, seed=seed, per_item_seeds=per_item)
        assert torch.isfinite(out).all()
    # the wrap rule: seed + offset modulo 2**64, so item 1 of a batch at the top seed is seed 0
    if per_item:
        top = sample(models, case, n=2, seed=MAX_SEED, per_item_seeds=True)
        zero = sample(models, case, n=1, seed=0, per_item_seeds=True)
        assert_close_ref(top[1:], zero, 1e-5, "item 1 at the top seed vs seed 0")
    for bad in (-1, 2**64, 1.5, "7"):
        with pytest.raises(VDInputError, match="seed"):
            sample(models, case, seed=bad, per_item_seeds=per_item)


def test_generator_seed_rule():
    assert validation.generator_seed(20, 100) == 120  # official seeds keep their noise
    assert validation.generator_seed(MAX_SEED, 1) == 0
    assert validation.generator_seed(MAX_SEED, 100) == 99
    torch.Generator().manual_seed(validation.generator_seed(MAX_SEED, 100))


# ---------------------------------------------------------------------------------------------
# Non-finite numbers: refused at the input, caught in the result with the likely cause.


def test_non_finite_inputs_are_refused_before_sampling(models, case):
    calls = []
    diffuser = _Counting(models.diffuser, calls)
    latent = torch.zeros(1, 4, case["height"] // 8, case["width"] // 8)
    bad_latent = latent.clone()
    bad_latent[0, 0, 0, 0] = math.nan
    c = case["contexts"][0]
    nan_ratio = [GuidedContext(c.kind, c.cond, c.uncond, ratio=math.nan), c]
    inf_tokens = [GuidedContext(c.kind, c.cond * math.inf, c.uncond)]
    cases = [
        ({"guidance": 1e30}, None, "guidance"), ({"guidance": math.nan}, None, "guidance"),
        ({"guidance": math.inf}, None, "guidance"), ({}, nan_ratio, "strength"), ({}, inf_tokens, "context"),
    ]
    for options, contexts, match in cases:
        with pytest.raises(VDInputError, match=match):
            sample(models, case, contexts=contexts, diffuser=diffuser, **options)
    with pytest.raises(VDInputError, match="init_latent"):
        sample_image(diffuser, case["contexts"], width=case["width"], height=case["height"], n=1,
                     options=SamplingOptions(steps=2), init_latent=bad_latent, denoise=0.5)
    for strengths in ([math.nan, 1.0], [math.inf, 1.0]):
        with pytest.raises(VDInputError, match="strength"):
            mix_contexts([case["contexts"], case["contexts"]], strengths)
    assert calls == []  # nothing reached the diffuser
    image = torch.rand(1, 3, case["height"], case["width"])
    size = {"n": 1, "width": case["width"], "height": case["height"], "options": SamplingOptions(steps=2)}
    for bad in (math.nan, math.inf):
        with pytest.raises(VDInputError, match="weight"):
            multi_context(models, "", [ImageSlot(image, weight=bad)], **size)
        with pytest.raises(VDInputError, match="text strength"):
            multi_context(models, "a prompt", [ImageSlot(image)], text_strength=bad, **size)


def test_damaged_weights_are_named_instead_of_a_nan_image(models, case):
    damaged = copy.deepcopy(models.diffuser)
    weight = next(p for name, p in damaged.named_parameters() if name.startswith("image.data_blocks"))
    weight.data.view(-1)[0] = math.nan
    with pytest.raises(NumericalError, match="damaged"):
        sample(models, case, diffuser=damaged)

    vae = copy.deepcopy(models.image_vae)
    vae.decoder.conv_in.weight.data.view(-1)[0] = math.nan
    latents = torch.zeros(1, 4, case["height"] // 8, case["width"] // 8)
    with pytest.raises(NumericalError, match="image VAE"):
        vae.decode(latents)
    with pytest.raises(VDInputError, match="latents"):
        models.image_vae.decode(latents * math.nan)


# ---------------------------------------------------------------------------------------------
# Images and masks: [0, 1] or refused, before a resize clamps them.


def test_images_outside_unit_range_are_refused_before_resizing(models, case):
    image = torch.rand(1, 3, case["height"] + 8, case["width"])
    for bad, match in ((image * 255, "divide by 255"), (image * 2 - 1, "−1…1"), (_with_nan(image), "NaN")):
        with pytest.raises(VDInputError, match=match):
            resize_images(bad, case["width"], case["height"])
        with pytest.raises(VDInputError, match=match):
            image_variation(models, bad, n=1, width=case["width"], height=case["height"],
                            options=SamplingOptions(steps=2))
        with pytest.raises(VDInputError):
            models.clip.encode_image(bad)
    with pytest.raises(VDInputError, match="divide by 255"):
        resize_masks(image[:, :1] * 255, case["width"], case["height"])
    resize_images(image * 1.05, case["width"], case["height"])  # resampling overshoot stays accepted


def _with_nan(x):
    x = x.clone()
    x.view(-1)[0] = math.nan
    return x


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "LA", "P", "PA", "RGBA", "CMYK", "1", "YCbCr", "RGB"])
def test_every_pil_mode_reads_at_its_bit_depth(tmp_path, mode):
    """A grey ramp saved in ``mode`` reads back as the same ramp in [0, 1] (16-bit PNGs were white)."""
    ramp = np.linspace(0, 1, 48, dtype=np.float64)[None].repeat(8, axis=0)
    image = _ramp_image(ramp, mode)
    suffix = ".png" if mode in ("I;16", "I", "L", "LA", "P", "PA", "RGBA", "1", "RGB") else ".tiff"
    if mode in ("YCbCr", "CMYK"):
        suffix = ".jpg" if mode == "CMYK" else ".tiff"
    path = tmp_path / f"ramp{suffix}"
    try:
        image.save(path)
    except (OSError, KeyError, ValueError):
        path = None  # this Pillow cannot write the mode to a file: read the image object instead
    pixels = read_image_file(path)[0] if path is not None else pil_to_tensor(image, 3)
    mask = read_mask_file(path)[0] if path is not None else pil_to_tensor(image, 1)
    assert pixels.shape == (3, 8, 48) and mask.shape == (1, 8, 48)
    expected = torch.from_numpy(ramp).float()
    if mode == "1":  # dithered to black and white: only the local mean follows the ramp
        pixels, mask, expected = (t.reshape(*t.shape[:-1], 6, 8).mean(-1) for t in (pixels, mask, expected))
    tol = 0.3 if mode == "1" else 0.06 if mode in ("P", "PA", "CMYK", "YCbCr") else 1 / 255
    assert (pixels.mean(0) - expected).abs().max() <= tol, mode
    assert (mask[0] - expected).abs().max() <= tol, mode


def _ramp_image(ramp: np.ndarray, mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).round().astype(np.uint16))
    if mode == "I":
        return Image.fromarray((ramp * 65535).round().astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32), "F")
    grey = Image.fromarray((ramp * 255).round().astype(np.uint8), "L")
    return grey.convert(mode)


def test_unreadable_modes_and_ranges_are_refused(tmp_path):
    with pytest.raises(VDInputError, match="float image"):
        pil_to_tensor(Image.fromarray(np.full((4, 4), 200.0, np.float32), "F"), 3)
    with pytest.raises(VDInputError, match="16-bit"):
        pil_to_tensor(Image.fromarray(np.full((4, 4), 2**20, np.int32), "I"), 3)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(VDInputError, match="not an image"):
        read_image_file(junk)


# ---------------------------------------------------------------------------------------------
# Text: Optimus input and text latents.


def test_optimus_refuses_text_without_words(models):
    for text in ("\x00\x01\x02", "\x07 \x1b\t", "\u200b\x00"):
        with pytest.raises(VDInputError, match="no word"):
            models.optimus.encode([text])
    assert models.optimus.encode(["a red car"]).shape[-1] == models.optimus.latent_size


def test_text_latents_are_checked_before_decoding(models):
    width = models.optimus.latent_size
    with pytest.raises(VDInputError, match="NaN"):
        models.optimus.decode(torch.full((1, width), math.nan))
    with pytest.raises(VDInputError, match=f"\\(B, {width}\\)"):
        models.optimus.decode(torch.zeros(1, width + 1))


# ---------------------------------------------------------------------------------------------
# Devices, shared models, memory.


def test_devices_are_checked():
    for bad, match in (("banana", "unknown device"), ("cuda:99", "cuda"), ("mps", "MPS")):
        if bad == "cuda:99" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
            continue
        if bad == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(VDInputError, match=match):
            validation.check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(VDInputError, match="CUDA is not available"):
            validation.check_device("cuda")
    assert validation.check_device("cpu") == torch.device("cpu")


def test_a_shared_diffuser_is_never_converted_in_place(models, case):
    """Another thread may be sampling with it: a run in another dtype is refused, the model unchanged."""
    before = {name: p.dtype for name, p in models.diffuser.named_parameters()}
    other = torch.float64 if next(models.diffuser.parameters()).dtype != torch.float64 else torch.float32
    with pytest.raises(VDInputError, match="not converted in place"):
        sample(models, case, dtype=other)
    assert {name: p.dtype for name, p in models.diffuser.named_parameters()} == before
    assert torch.isfinite(sample(models, case, dtype=next(models.diffuser.parameters()).dtype)).all()


def test_runs_that_cannot_fit_are_refused_before_allocating(models, case):
    mc = models.diffuser.config.model_channels
    fits = dict(device="cpu", dtype=torch.float32, model_channels=mc)
    one = memory_budget.sampling_bytes(1, case["width"], case["height"], model_channels=mc, itemsize=4)
    free = 10 * one + memory_budget.decode_bytes(1, case["width"], case["height"], vae_channels=128, itemsize=4)
    memory_budget.check_image_run_fits(2, case["width"], case["height"], free=free, **fits)
    with pytest.raises(VDInputError, match="at most [1-9][0-9]* image"):
        memory_budget.check_image_run_fits(10000, case["width"], case["height"], free=free, **fits)
    with pytest.raises(VDInputError, match="largest square"):
        memory_budget.check_image_run_fits(1, 8192, 8192, free=free, **fits)
    with pytest.raises(VDInputError, match="16384"):
        memory_budget.check_image_run_fits(1, 65536, 65536, free=2**60, **fits)

def test_the_sampler_checks_the_budget_before_allocating(models, case, monkeypatch):
    """With (pretended) little free memory, even the fixture's size is refused before any model call."""
    calls = []
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: 1024)
    with pytest.raises(VDInputError, match="does not fit"):
        sample(models, case, diffuser=_Counting(models.diffuser, calls))
    assert calls == []


def test_decoding_in_chunks_gives_the_same_images(models, case):
    latents = torch.randn(3, 4, case["height"] // 8, case["width"] // 8, generator=torch.Generator().manual_seed(0))
    whole = models.image_vae.decode(latents, batch_size=3)
    chunked = models.image_vae.decode(latents, batch_size=1)
    assert torch.allclose(whole, chunked, atol=1e-5)
    one = memory_budget.decode_bytes(1, case["width"], case["height"], vae_channels=128, itemsize=4)
    assert memory_budget.decode_batch_size(1000, case["width"], case["height"], vae_channels=128, itemsize=4,
                                           device="cpu") <= max(1, memory_budget.available_bytes("cpu") // one)


class _Counting(torch.nn.Module):
    """A diffuser wrapper that records every forward (none must happen for refused inputs)."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls, self.config = inner, calls, inner.config

    def forward(self, *args):
        self.calls.append(1)
        return self.inner(*args)
