"""The ComfyUI bridge without ComfyUI (its fallbacks) and inside a real ComfyUI.

The first tests pin the plain fallbacks the pack uses where ComfyUI is absent (scripts, the plain
test run), with ComfyUI hidden from the bridge when it is importable. The last tests run inside ComfyUI when ``$VD_COMFYUI_DIR`` names a ComfyUI work tree and pytest
runs with that ComfyUI's Python (docs/comfyui.md):
``VD_COMFYUI_DIR=/tmp/ComfyUI /tmp/venv-comfy/bin/python -m pytest -q tests/test_comfy_bridge.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import assert_close_ref, load_tensors


@pytest.fixture
def bridge(pack, monkeypatch):
    """The bridge as it behaves where ComfyUI is absent, even in a process where it is importable."""
    module = importlib.import_module("vd_pack.nodes.comfy_bridge")
    monkeypatch.setattr(module, "comfy_available", lambda: False)
    return module


@pytest.fixture(scope="module")
def comfy_vae(pack):
    return importlib.import_module("vd_pack.nodes.comfy_vae")


@pytest.fixture(scope="module")
def errors(pack):
    return importlib.import_module("vd_pack.vd_core.errors")


@pytest.fixture(scope="module")
def expected(release_dir):
    return release_dir / "expected"


# ------------------------------------------------------------------------- folders and files


def test_folder_functions_are_empty_without_comfyui(bridge):
    bridge.register_model_folders()  # a no-op that must not fail
    assert bridge.list_model_files("versatile_diffusion") == []
    assert bridge.list_clip_choices() == []
    assert bridge.comfy_tokenizer_dirs() == []


def test_resolve_model_path_takes_the_name_as_a_path(bridge, release_dir):
    path = release_dir / "kl-f8.pth"
    assert bridge.resolve_model_path("versatile_diffusion", str(path)) == path
    folder = release_dir / "clip-vit-large-patch14"
    assert bridge.resolve_model_path("clip_vision", str(folder)) == folder


def test_resolve_model_path_missing_file_is_a_clear_error(bridge, errors, tmp_path):
    missing = tmp_path / "vd-four-flow-v1-0-fp16.pth"
    with pytest.raises(bridge.ModelFileNotFoundError) as info:
        bridge.resolve_model_path("versatile_diffusion", str(missing))
    # Both a CheckpointError (for the nodes' reporting) and a FileNotFoundError (for callers
    # that try several folders, as the loader does).
    assert isinstance(info.value, errors.CheckpointError) and isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------- devices and dtypes


def test_devices_without_comfyui(bridge):
    assert bridge.offload_device() == torch.device("cpu")
    if torch.cuda.is_available():
        assert bridge.compute_device().type == "cuda"
    elif not torch.backends.mps.is_available():
        assert bridge.compute_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "choice, device, dtype",
    [("auto", "cpu", torch.float32), ("fp16", "cpu", torch.float16), ("bf16", "cpu", torch.bfloat16),
     ("fp32", "cpu", torch.float32), ("auto", "cuda", torch.float16)],
)
def test_pick_dtype(bridge, choice, device, dtype):
    assert bridge.pick_dtype(choice, device) == dtype


def test_pick_dtype_rejects_unknown_choices(bridge, errors):
    with pytest.raises(errors.VDInputError, match="fp8"):
        bridge.pick_dtype("fp8", "cpu")


def test_managed_module_fallback_returns_the_module_itself(pack, bridge):
    parts = importlib.import_module("vd_pack.nodes.parts")
    module = torch.nn.Linear(2, 2)
    handle = parts.ManagedModule(module, "test_part")
    assert handle.patcher is None
    assert handle.use() is module
    assert next(module.parameters()).device.type == bridge.compute_device().type


# ------------------------------------------------------------------------- progress and interrupts


def test_progress_cancel_and_interrupt_fallbacks(bridge, errors):
    report = bridge.progress(3)
    report(0, 3, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))  # image latents
    report(2, 3, torch.zeros(2, 48), torch.zeros(2, 48))  # text latents
    assert bridge.cancel_check()() is False
    with pytest.raises(errors.Cancelled):
        bridge.raise_interrupted()


# ------------------------------------------------------------------------- core VAE fallback


@pytest.fixture(scope="module")
def kl_f8_state(pack, release_dir):
    checkpoint = importlib.import_module("vd_pack.vd_core.checkpoint")
    return checkpoint.read_state_dict(release_dir / "kl-f8.pth", what="kl-f8")


def test_core_vae_fallback_decodes_channels_last(bridge, comfy_vae, kl_f8_state, expected):
    vae = comfy_vae.core_vae(kl_f8_state)
    latent = load_tensors(expected / "inputs.safetensors")["vae_latent"]  # scaled, as the official decoder takes it
    reference = load_tensors(expected / "vae.safetensors")["decode"]  # (1, 3, 64, 64)
    images = vae.decode(latent / 0.18215)  # the LATENT convention: unscaled
    assert images.shape == (1, 64, 64, 3)
    assert_close_ref(images.movedim(-1, 1), reference, 1e-4, "core_vae fallback decode")


def test_core_vae_fallback_encodes_with_comfyui_cropping(bridge, comfy_vae, kl_f8_state, expected):
    vae = comfy_vae.core_vae(kl_f8_state)
    image = load_tensors(expected / "inputs.safetensors")["image_0_u8"].float() / 255  # (64, 64, 3)
    mean = load_tensors(expected / "vae.safetensors")["posterior_mean"]
    assert_close_ref(vae.encode(image[None]), mean, 1e-4, "core_vae fallback encode")
    # ComfyUI's VAEEncode centre-crops to multiples of 8 and drops alpha: 71×69 RGBA → 64×64.
    padded = torch.nn.functional.pad(image.movedim(-1, 0), (2, 3, 3, 4)).movedim(0, -1)
    rgba = torch.cat([padded, torch.ones_like(padded[..., :1])], dim=-1)[None]
    assert rgba.shape == (1, 71, 69, 4)
    assert_close_ref(vae.encode(rgba), mean, 1e-4, "core_vae fallback encode of a cropped RGBA image")


def test_core_vae_rejects_other_files(bridge, comfy_vae, errors, kl_f8_state):
    broken = {k: v for k, v in kl_f8_state.items() if k != "decoder.mid.attn_1.q.weight"}
    with pytest.raises(errors.CheckpointError, match="decoder.mid.attn_1.q.weight"):
        comfy_vae.core_vae(broken)
    with pytest.raises(errors.CheckpointError, match="kl-f8"):
        comfy_vae.core_vae({"decoder.transformer.wte.weight": torch.zeros(4, 4)})


# ------------------------------------------------------------------------- inside a real ComfyUI


@pytest.fixture(scope="module")
def inside(pack, release_models):
    """The bridge and ComfyUI's own nodes module, in-process, with the release miniature registered."""
    return importlib.import_module("vd_pack.nodes.comfy_bridge"), release_models.nodes


def test_inside_comfyui_folders_devices_and_tokenizer(inside, release_dir):
    bridge, _ = inside
    assert "vd-four-flow-v1-0-fp16.pth" in bridge.list_model_files("versatile_diffusion")
    assert "clip-vit-large-patch14" in bridge.list_clip_choices()  # a Hugging Face folder, listed once
    assert bridge.resolve_model_path("versatile_diffusion", "kl-f8.pth") == release_dir / "kl-f8.pth"
    assert bridge.resolve_model_path(bridge.VD_FOLDER, "clip-vit-large-patch14").is_dir()
    with pytest.raises(bridge.ModelFileNotFoundError, match="versatile_diffusion"):
        bridge.resolve_model_path("versatile_diffusion", "missing.pth")
    assert any((d / "vocab.json").is_file() for d in bridge.comfy_tokenizer_dirs())
    assert bridge.compute_device() == torch.device("cpu") and bridge.pick_dtype("auto", "cpu") == torch.float32


def test_inside_comfyui_parts_progress_and_interrupt(inside):
    bridge, _ = inside
    import comfy.model_management as mm
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    parts = importlib.import_module("vd_pack.nodes.parts")
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    handle = parts.ManagedModule(module, "VD_test_part")
    assert handle.patcher is not None and handle.use() is module
    assert not handle.full_load  # every layer got ComfyUI's casting class: --lowvram can stream it
    assert all(hasattr(layer, "comfy_cast_weights") for layer in module)
    assert any(loaded.model is handle.patcher for loaded in mm.current_loaded_models)
    assert type(handle.patcher.model).__name__ == "VD_test_part"  # what "Requested to load …" prints
    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total, preview)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    report = bridge.progress(2)
    report(0, 2, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    report(1, 2, torch.zeros(1, 48), torch.zeros(1, 48))
    assert [e[:2] for e in events] == [(1, 2), (2, 2)]
    assert events[0][2][0] == "JPEG" and events[1][2] is None  # previews for image latents only
    mm.interrupt_current_processing(True)
    assert bridge.cancel_check()() is True
    with pytest.raises(mm.InterruptProcessingException):
        bridge.raise_interrupted()
    assert bridge.cancel_check()() is False  # cleared, as ComfyUI's own samplers do


def test_inside_comfyui_core_vae_decode_node(inside, comfy_vae, kl_f8_state, expected):
    _, comfy_nodes = inside
    vae = comfy_vae.core_vae(kl_f8_state)
    latent = load_tensors(expected / "inputs.safetensors")["vae_latent"]
    (images,) = comfy_nodes.VAEDecode().decode(vae, {"samples": latent / 0.18215})
    assert_close_ref(images.movedim(-1, 1), load_tensors(expected / "vae.safetensors")["decode"], 1e-4, "core VAEDecode")
