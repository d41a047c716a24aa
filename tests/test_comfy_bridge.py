"""The ComfyUI bridge without ComfyUI (its fallbacks), VD as a core MODEL (`nodes/model_patch.py`),
and, optionally, both inside a real ComfyUI.

CI has no ComfyUI, so most tests pin the plain fallbacks every node relies on there, and check the
KSampler path's numerics by calling the UNet adapter the way ComfyUI's BaseModel does (cond and
uncond batched or separate, primary tokens repeat-padded) against the official outputs in
``tiny_release/expected``.

The last tests run inside ComfyUI when ``$VD_COMFYUI_DIR`` names a ComfyUI work tree and pytest
runs with that ComfyUI's Python (docs/comfyui.md):
``VD_COMFYUI_DIR=/tmp/ComfyUI /tmp/venv-comfy/bin/python -m pytest -q tests/test_comfy_bridge.py``.
"""

from __future__ import annotations

import importlib
import os
import sys

from types import SimpleNamespace

import pytest
import torch

from conftest import assert_close_ref, load_tensors
from pack_import import import_pack


@pytest.fixture(scope="module")
def pack():
    return import_pack()


@pytest.fixture(scope="module")
def bridge(pack):
    module = importlib.import_module("vd_pack.nodes.comfy_bridge")
    if module.comfy_available():
        pytest.skip("ComfyUI is importable here; these tests pin the fallbacks used without it")
    return module


@pytest.fixture(scope="module")
def model_patch(pack):
    return importlib.import_module("vd_pack.nodes.model_patch")


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


def test_managed_module_fallback_returns_the_module_itself(bridge):
    module = torch.nn.Linear(2, 2)
    handle = bridge.managed(module)
    assert handle.patcher is None
    assert handle.use() is module
    assert next(module.parameters()).device.type == bridge.compute_device().type
    with bridge.managed(module) as inside:
        assert inside is module


def test_ensure_on_device_moves_only_when_needed(bridge):
    module = torch.nn.Linear(2, 2)
    moves = []
    move = module.to
    module.to = lambda *args, **kwargs: moves.append(args) or move(*args, **kwargs)
    bridge.ensure_on_device(module, torch.device("cpu"))  # already there: not moved
    assert moves == []
    bridge.ensure_on_device(module, torch.device("meta"))
    assert moves == [(torch.device("meta"),)] and module.weight.is_meta


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


def test_core_vae_fallback_decodes_channels_last(bridge, kl_f8_state, expected):
    vae = bridge.core_vae(kl_f8_state)
    latent = load_tensors(expected / "inputs.safetensors")["vae_latent"]  # scaled, as the official decoder takes it
    reference = load_tensors(expected / "vae.safetensors")["decode"]  # (1, 3, 64, 64)
    images = vae.decode(latent / 0.18215)  # the LATENT convention: unscaled
    assert images.shape == (1, 64, 64, 3)
    assert_close_ref(images.movedim(-1, 1), reference, 1e-4, "core_vae fallback decode")


def test_core_vae_fallback_encodes_with_comfyui_cropping(bridge, kl_f8_state, expected):
    vae = bridge.core_vae(kl_f8_state)
    image = load_tensors(expected / "inputs.safetensors")["image_0_u8"].float() / 255  # (64, 64, 3)
    mean = load_tensors(expected / "vae.safetensors")["posterior_mean"]
    assert_close_ref(vae.encode(image[None]), mean, 1e-4, "core_vae fallback encode")
    # ComfyUI's VAEEncode centre-crops to multiples of 8 and drops alpha: 71×69 RGBA → 64×64.
    padded = torch.nn.functional.pad(image.movedim(-1, 0), (2, 3, 3, 4)).movedim(0, -1)
    rgba = torch.cat([padded, torch.ones_like(padded[..., :1])], dim=-1)[None]
    assert rgba.shape == (1, 71, 69, 4)
    assert_close_ref(vae.encode(rgba), mean, 1e-4, "core_vae fallback encode of a cropped RGBA image")


def test_core_vae_rejects_other_files(bridge, errors, kl_f8_state):
    broken = {k: v for k, v in kl_f8_state.items() if k != "decoder.mid.attn_1.q.weight"}
    with pytest.raises(errors.CheckpointError, match="decoder.mid.attn_1.q.weight"):
        bridge.core_vae(broken)
    with pytest.raises(errors.CheckpointError, match="kl-f8"):
        bridge.core_vae({"decoder.transformer.wte.weight": torch.zeros(4, 4)})


def test_comfy_model_needs_comfyui(bridge, errors):
    with pytest.raises(errors.VDError, match="inside ComfyUI"):
        bridge.comfy_model(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------- VD as a ComfyUI MODEL


@pytest.fixture(scope="module")
def diffuser(pack, release_dir):
    loading = importlib.import_module("vd_pack.vd_core.diffuser")
    return loading.load_diffuser(release_dir / "vd-four-flow-v1-0-fp16.pth", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ddim_contexts(expected):
    return load_tensors(expected / "ddim_contexts.safetensors")


def _guided(kind, cond, uncond, ratio=1.0):
    contexts = importlib.import_module("vd_pack.vd_core.contexts")
    return contexts.GuidedContext(kind, cond[:1], uncond[:1], ratio)


def _comfy_call(adapter, bridge, x, t, entries):
    """What ComfyUI's BaseModel does with a batch of CONDITIONING entries: process_cond repeats
    each to the latent batch, concat joins them along the batch, extras become keyword arguments."""
    batch = x.shape[0]
    tokens = torch.cat([e[0].expand(batch, -1, -1) for e in entries])
    extras = entries[0][1]
    extra_tokens = [torch.cat([e[1][bridge.COND_EXTRA][i].expand(batch, -1, -1) for e in entries])
                    for i in range(len(extras[bridge.COND_EXTRA]))]
    with torch.no_grad():
        return adapter(
            torch.cat([x] * len(entries)), torch.full((batch * len(entries),), float(t)), context=tokens,
            transformer_options={}, **{bridge.COND_KINDS: extras[bridge.COND_KINDS],
                                       bridge.COND_RATIOS: extras[bridge.COND_RATIOS], bridge.COND_EXTRA: extra_tokens},
        )


def test_conditioning_pair_structure(bridge, model_patch, ddim_contexts):
    text = _guided("text", ddim_contexts["dual_text_c"], ddim_contexts["text_u"], 0.4)
    image = _guided("image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"], 0.6)
    positive, negative = model_patch.conditioning_pair((text, image))
    assert len(positive) == len(negative) == 1
    assert positive[0][0] is text.cond and negative[0][0] is text.uncond
    for entry, extra in ((positive[0][1], image.cond), (negative[0][1], image.uncond)):
        assert entry[bridge.COND_KINDS] == ("text", "image")
        assert entry[bridge.COND_RATIOS] == (0.4, 0.6)
        assert len(entry[bridge.COND_EXTRA]) == 1 and entry[bridge.COND_EXTRA][0] is extra


@pytest.mark.parametrize("text_first", [True, False])
def test_dual_context_batched_like_comfyui_matches_official_eps(bridge, model_patch, diffuser, ddim_contexts, expected, text_first):
    case = load_tensors(expected / "ddim_dual.safetensors")
    text = _guided("text", ddim_contexts["dual_text_c"], ddim_contexts["text_u"], 0.4)
    image = _guided("image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"], 0.6)
    positive, negative = model_patch.conditioning_pair((text, image) if text_first else (image, text))
    adapter = model_patch.VDUNetAdapter(diffuser)
    eps_uncond, eps_cond = _comfy_call(adapter, bridge, case["x_init"], case["timesteps"][0], negative + positive).chunk(2)
    assert_close_ref(eps_uncond, case["eps_uncond"][0], 1e-4, "dual eps_uncond through the adapter")
    assert_close_ref(eps_cond, case["eps_cond"][0], 1e-4, "dual eps_cond through the adapter")


def test_text_context_run_separately_and_repeat_padded(bridge, model_patch, diffuser, ddim_contexts, expected):
    case = load_tensors(expected / "ddim_t2i.safetensors")
    text = _guided("text", ddim_contexts["t2i_c"], ddim_contexts["text_u"])
    positive, negative = model_patch.conditioning_pair((text,))
    adapter = model_patch.VDUNetAdapter(diffuser)
    t = case["timesteps"][3]
    x = case["x_steps"][2]  # the latent entering step 3
    assert_close_ref(_comfy_call(adapter, bridge, x, t, negative), case["eps_uncond"][3], 1e-4, "t2i uncond alone")
    # ComfyUI batches conds of different token counts by repeating the shorter along the tokens
    # (comfy/conds.py CONDCrossAttn); attention must not change.
    repeated = [[positive[0][0].repeat(1, 3, 1), positive[0][1]]]  # the cond half, 231 tokens
    assert_close_ref(_comfy_call(adapter, bridge, x, t, repeated), case["eps_cond"][3], 1e-4, "t2i cond repeated ×3")


def test_image_variation_through_the_adapter(bridge, model_patch, diffuser, ddim_contexts, expected):
    case = load_tensors(expected / "ddim_i2i.safetensors")
    image = _guided("image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"])
    positive, negative = model_patch.conditioning_pair((image,))
    out = _comfy_call(model_patch.VDUNetAdapter(diffuser), bridge, case["x_init"], case["timesteps"][0], negative + positive)
    assert_close_ref(out, torch.cat([case["eps_uncond"][0], case["eps_cond"][0]]), 1e-4, "i2i eps through the adapter")


def test_adapter_rejects_foreign_conditioning(model_patch, diffuser, errors):
    adapter = model_patch.VDUNetAdapter(diffuser)
    assert adapter.dtype == torch.float32
    x, t, tokens = torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), torch.zeros(1, 77, 40)
    with pytest.raises(errors.VDInputError, match="VD Context to Conditioning"):
        adapter(x, t, context=tokens)  # e.g. from CLIP Text Encode: no VD keys
    with pytest.raises(errors.VDInputError, match="ControlNet"):
        adapter(x, t, context=tokens, control={"middle": []}, vd_kinds=("text",), vd_ratios=(1.0,), vd_extra_contexts=[])
    with pytest.raises(errors.VDInputError, match="2 contexts but carries 1"):
        adapter(x, t, context=tokens, vd_kinds=("text", "image"), vd_ratios=(0.5, 0.5), vd_extra_contexts=[])


def test_nodes(model_patch, errors, ddim_contexts):
    text = _guided("text", ddim_contexts["t2i_c"], ddim_contexts["text_u"])
    positive, negative = model_patch.VDContextToConditioning().convert((text,))
    assert torch.equal(positive[0][0], text.cond) and torch.equal(negative[0][0], text.uncond)
    with pytest.raises(errors.VDInputError, match="^VD Context to Conditioning: .*no context"):
        model_patch.VDContextToConditioning().convert(())
    with pytest.raises(errors.MissingPartError, match="^VD Model as ComfyUI MODEL: .*diffuser"):
        model_patch.VDModelAsComfyModel().wrap(None)
    for node in (model_patch.VDModelAsComfyModel, model_patch.VDContextToConditioning):
        spec = node.INPUT_TYPES()["required"]
        assert node.DESCRIPTION and all(options.get("tooltip") for _, options in spec.values())
        assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)


# ------------------------------------------------------------------------- inside a real ComfyUI


@pytest.fixture(scope="module")
def comfy(pack, release_dir):
    """ComfyUI imported in-process on the CPU, with the tiny release folder as a model folder."""
    comfy_dir = os.environ.get("VD_COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("set VD_COMFYUI_DIR to a ComfyUI work tree (and run pytest with its Python) to test inside ComfyUI")
    sys.path.insert(0, comfy_dir)  # before the repository root, so that `nodes` is ComfyUI's nodes.py
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]  # ComfyUI parses the command line on import
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import folder_paths
        import nodes as comfy_nodes
    finally:
        sys.argv = argv
    bridge = importlib.import_module("vd_pack.nodes.comfy_bridge")
    assert bridge.comfy_available()
    bridge.register_model_folders()
    folder_paths.add_model_folder_path("versatile_diffusion", str(release_dir))
    return bridge, comfy_nodes


def test_inside_comfyui_folders_devices_and_tokenizer(comfy, release_dir):
    bridge, _ = comfy
    assert "vd-four-flow-v1-0-fp16.pth" in bridge.list_model_files("versatile_diffusion")
    assert "clip-vit-large-patch14" in bridge.list_clip_choices()  # a Hugging Face folder, listed once
    assert bridge.resolve_model_path("versatile_diffusion", "kl-f8.pth") == release_dir / "kl-f8.pth"
    assert bridge.resolve_model_path(bridge.VD_FOLDER, "clip-vit-large-patch14").is_dir()
    with pytest.raises(bridge.ModelFileNotFoundError, match="versatile_diffusion"):
        bridge.resolve_model_path("versatile_diffusion", "missing.pth")
    assert any((d / "vocab.json").is_file() for d in bridge.comfy_tokenizer_dirs())
    assert bridge.compute_device() == torch.device("cpu") and bridge.pick_dtype("auto", "cpu") == torch.float32


def test_inside_comfyui_memory_progress_and_interrupt(comfy):
    bridge, _ = comfy
    import comfy.model_management as mm
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    module = torch.nn.Linear(2, 2)
    handle = bridge.managed(module)
    assert handle.patcher is not None and handle.use() is module
    assert any(loaded.model is handle.patcher for loaded in mm.current_loaded_models)
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


def test_inside_comfyui_core_vae_decode_node(comfy, kl_f8_state, expected):
    bridge, comfy_nodes = comfy
    vae = bridge.core_vae(kl_f8_state)
    latent = load_tensors(expected / "inputs.safetensors")["vae_latent"]
    (images,) = comfy_nodes.VAEDecode().decode(vae, {"samples": latent / 0.18215})
    assert_close_ref(images.movedim(-1, 1), load_tensors(expected / "vae.safetensors")["decode"], 1e-4, "core VAEDecode")


def test_inside_comfyui_ksampler_reproduces_official_ddim(comfy, diffuser, ddim_contexts, expected):
    """KSampler (Advanced) with ddim/ddim_uniform is DDIM in sigma space: from the official start
    latent it must reach the official final x0 estimate (the official last step keeps ᾱ₀ < 1, so
    compare x0, not x)."""
    bridge, comfy_nodes = comfy
    model_patch = importlib.import_module("vd_pack.nodes.model_patch")
    case = load_tensors(expected / "ddim_dual.safetensors")
    text = _guided("text", ddim_contexts["dual_text_c"], ddim_contexts["text_u"], 0.4)
    image = _guided("image", ddim_contexts["i2i_c"], ddim_contexts["image_u_zero"], 0.6)
    (model,) = model_patch.VDModelAsComfyModel().wrap(SimpleNamespace(module=diffuser))
    positive, negative = model_patch.VDContextToConditioning().convert((text, image))
    batches = []
    model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    sigma = model.model.model_sampling.sigma(case["timesteps"][0].float())
    start = {"samples": case["x_init"] * (1 + sigma**2) ** 0.5 / 0.18215}  # VD's x_t in ComfyUI's units
    (out,) = comfy_nodes.KSamplerAdvanced().sample(
        model, "disable", 0, 10, 7.5, "ddim", "ddim_uniform", positive, negative, start, 0, 10, "disable")
    assert batches == [4] * 10  # cond and uncond of both samples in one call per step, as VD does
    assert_close_ref(out["samples"] * 0.18215, case["pred_x0"][-1], 1e-4, "KSampler ddim final x0")
