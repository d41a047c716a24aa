"""kl-f8 image VAE (algorithm.md §6.1): parity with the official code on the tiny fixtures, loading of every
accepted layout, and the errors for files of the wrong kind and unusable inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close_ref, load_tensors
from safetensors.torch import save_file

from vd_core.checkpoint import read_state_dict
from vd_core.errors import CheckpointError, VDInputError
from vd_core.image_vae import LATENT_SCALE, load_image_vae


@pytest.fixture(scope="module")
def tiny_vae(tiny_dir):
    # weights.safetensors is an all-in-one VD state dict: this also exercises the "vae.image." subtree.
    return load_image_vae(tiny_dir / "weights.safetensors")


@pytest.fixture(scope="module")
def release_vae(release_dir):
    return load_image_vae(release_dir / "kl-f8.pth")


@pytest.fixture(scope="module")
def release_image(release_dir):
    u8 = load_tensors(release_dir / "expected" / "inputs.safetensors")["image_0_u8"]
    return u8.permute(2, 0, 1)[None].float() / 255


def test_tiny_posterior_matches_official(tiny_vae, tiny_dir, tiny_inputs):
    ref = load_tensors(tiny_dir / "vae.safetensors")
    mean, logvar = tiny_vae.encode_moments(tiny_inputs["pixels_sq"])
    assert_close_ref(mean, ref["posterior_mean"], 1e-4, "posterior mean")
    assert_close_ref(logvar, ref["posterior_logvar"], 1e-4, "posterior logvar")
    # encode without a generator is the deterministic posterior mean
    assert_close_ref(tiny_vae.encode(tiny_inputs["pixels_sq"]) * LATENT_SCALE, ref["vae_encode_mean_scaled"], 1e-4, "mean latent")


def test_tiny_posterior_sample_reproduces_official_seed(tiny_vae, tiny_dir, tiny_inputs):
    ref = load_tensors(tiny_dir / "vae.safetensors")
    seed = json.loads((tiny_dir / "vae.json").read_text())["seeds"]["vae_encode_torch_seed"]
    # the official sample uses torch.manual_seed(seed) + torch.randn: a CPU generator seeded alike
    sample = tiny_vae.encode(tiny_inputs["pixels_sq"], generator=torch.Generator().manual_seed(seed))
    assert sample.dtype == torch.float32 and sample.shape == ref["vae_encode_scaled"].shape
    assert_close_ref(sample * LATENT_SCALE, ref["vae_encode_scaled"], 1e-4, "posterior sample")
    other = tiny_vae.encode(tiny_inputs["pixels_sq"], generator=torch.Generator().manual_seed(seed + 1))
    assert (other - sample).abs().max() > 1e-2  # the noise really comes from the generator


def test_tiny_decode_matches_official(tiny_vae, tiny_dir, tiny_inputs):
    ref = load_tensors(tiny_dir / "vae.safetensors")
    images = tiny_vae.decode(tiny_inputs["vae_latent_in"] / LATENT_SCALE)  # the fixture's latents are scaled
    assert images.dtype == torch.float32
    assert_close_ref(images, ref["vae_decode"], 1e-4, "decode")


def test_release_kl_f8_end_to_end(release_vae, release_dir, release_image):
    expected = load_tensors(release_dir / "expected" / "vae.safetensors")
    latent = load_tensors(release_dir / "expected" / "inputs.safetensors")["vae_latent"]
    assert_close_ref(release_vae.decode(latent / LATENT_SCALE), expected["decode"], 1e-4, "release decode")
    mean, logvar = release_vae.encode_moments(release_image)
    assert_close_ref(mean, expected["posterior_mean"], 1e-4, "release posterior mean")
    assert_close_ref(logvar, expected["posterior_logvar"], 1e-4, "release posterior logvar")


def test_safetensors_and_prefixed_copies_load_identically(release_dir, release_vae, release_image, tmp_path):
    state = read_state_dict(release_dir / "kl-f8.pth")
    variants = {
        "plain.safetensors": state,
        # a full SD checkpoint: the VAE is the first_stage_model subtree, the rest is ignored
        "sd.safetensors": {**{f"first_stage_model.{k}": v for k, v in state.items()},
                           "model.diffusion_model.out.2.bias": torch.zeros(4)},
        # an all-in-one VD state dict
        "vd.safetensors": {**{f"vae.image.{k}": v for k, v in state.items()},
                           "vae.text.encoder.linear.weight": torch.zeros(2, 2)},
    }
    reference = release_vae.encode(release_image)
    for name, tensors in variants.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        vae = load_image_vae(tmp_path / name)
        assert torch.equal(vae.encode(release_image), reference), name
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_reduced_precision(release_dir, release_vae, release_image):
    image = release_image[..., :16, :16]  # CPU half-precision convolutions are slow: keep it small
    mean32 = release_vae.encode(image)
    images32 = release_vae.decode(mean32)
    # float16 keeps 11 significant bits, bfloat16 only 8: tolerances of about 10 and 100 ulps
    for dtype, rel in ((torch.float16, 1e-2), (torch.bfloat16, 1e-1)):
        vae = load_image_vae(release_dir / "kl-f8.pth", dtype=dtype)
        assert vae.dtype == dtype
        mean = vae.encode(image)
        images = vae.decode(mean32)
        assert mean.dtype == images.dtype == torch.float32  # public outputs stay float32
        assert_close_ref(mean, mean32, rel, f"{dtype} encode")
        assert_close_ref(images, images32, rel, f"{dtype} decode")


def test_sizes_not_multiple_of_eight_are_rejected(release_vae):
    with pytest.raises(VDInputError, match="multiple of 8"):
        release_vae.encode(torch.rand(1, 3, 64, 60))
    with pytest.raises(VDInputError, match="multiple of 8"):
        release_vae.encode(torch.rand(1, 3, 36, 64))
    with pytest.raises(VDInputError, match="RGB"):
        release_vae.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(VDInputError, match="latent"):
        release_vae.decode(torch.rand(1, 48))


def test_diffusers_format_vae_is_refused(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3),
               "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3),
               "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="diffusers-format.*convert"):
        load_image_vae(path)


@pytest.mark.parametrize("name, kind", [
    ("vd-four-flow-v1-0-fp16.pth", "diffuser"),
    ("optimus-vae.pth", "Optimus"),
    ("clip-vit-large-patch14/model.safetensors", "CLIP"),
])
def test_other_release_files_are_named(release_dir, name, kind):
    with pytest.raises(CheckpointError, match=kind) as info:
        load_image_vae(release_dir / name)
    assert "kl-f8.pth" in str(info.value)


def test_missing_and_unexpected_keys_are_named(release_dir, tmp_path):
    state = read_state_dict(release_dir / "kl-f8.pth")
    broken = {k: v for k, v in state.items() if k != "decoder.mid.attn_1.q.bias"}
    broken["loss.logvar"] = torch.zeros(())
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.mid\.attn_1\.q\.bias.*loss\.logvar"):
        load_image_vae(tmp_path / "broken.safetensors")
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="does not look like an LDM image VAE"):
        load_image_vae(tmp_path / "other.safetensors")
