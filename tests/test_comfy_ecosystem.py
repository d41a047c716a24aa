"""ComfyUI's ecosystem on VD's image MODEL, in a real ComfyUI in-process, on the tiny release model.

Issue 11 item 4: an SD 1.5-format LoRA (kohya and diffusers/PEFT keys) changes the output exactly
as merging its delta does; FreeU / FreeU_V2, Self-Attention Guidance, Perturbed Attention Guidance
and HyperTile run and change the output; an SD 1.5-architecture ControlNet runs; attention (attn2)
patches apply, to both context layers of a mix; ModelSave / model merging give a file the VD
Loader loads back; what cannot apply says so.

Runs when ``$VD_COMFYUI_DIR`` names a ComfyUI work tree and pytest runs with its Python, e.g.
``VD_COMFYUI_DIR=/tmp/ComfyUI /tmp/venv-comfy/bin/python -m pytest -q tests/test_comfy_ecosystem.py``.
Sizes come from the model (its downsampling), never from one fixture set; the LoRAs, the
ControlNet and the patches are made in `comfy_ecosystem_parts.py`.
"""

from __future__ import annotations

import importlib
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from comfy_ecosystem_parts import (
    CLIP, DIFFUSER, LORA_STRENGTH, PATCHES, SD15_UNET, STEPS, assert_changed, conditioning, config_heads,
    count_transformer_blocks, ksample, load_model, make_controlnet, make_lora, max_diff, merged_copy, save_lora,
    sizes, vd_sample, vd_sample_conditioning,
)
from node_fixtures import comfy_image


@pytest.fixture(scope="module")
def eco(release_models, tmp_path_factory):
    """The in-process ComfyUI with the tiny release folder as the VD model folder (node_fixtures) and
    temporary folders for LoRAs and saved models."""
    work = tmp_path_factory.mktemp("comfy_models")
    (work / "loras").mkdir()
    (work / "saved").mkdir()
    release_models.register_models("loras", work / "loras")
    release_models.register_models("versatile_diffusion", work / "saved")
    return SimpleNamespace(nodes=release_models.nodes, folder_paths=release_models.folder_paths, work=work,
                           vd=importlib.import_module("vd_pack.nodes"))


@pytest.fixture(scope="module")
def vd(eco, nodes, release_dir):
    """The pack's nodes, the VD CLIP, the text and image contexts of the fixture's prompt/image."""
    with torch.inference_mode():
        _, _, clip, _, _ = nodes["VDLoader"].load(DIFFUSER, "none", "none", "none", CLIP, "none", "fp32")
        prompt = json.loads((release_dir / "expected" / "clip.json").read_text())["prompts"][0]
        text = nodes["VDCLIPTextContext"].encode(clip, prompt, "")[0]
        image = nodes["VDCLIPImageContext"].encode(comfy_image(release_dir / "expected" / "image_0.png"), 0.5, 1.0,
                                                   clip=clip)[0]
        (mix,) = nodes["VDDualContextMixer"].mix(text, 0.4, image, 0.6)
    return SimpleNamespace(nodes=nodes, text=text, image=image, mix=mix)


@pytest.fixture(scope="module")
def text_model(vd):
    return load_model(vd.nodes, "text")


@pytest.fixture(scope="module")
def mix_model(vd):
    return load_model(vd.nodes, "text+image")


# ----------------------------------------------------------------------------- 1. SD 1.5 LoRAs



@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_sd15_lora_equals_merging_its_delta(eco, vd, text_model, style, caplog):
    tensors, deltas = make_lora(text_model, style)
    name = save_lora(eco, tensors, f"tiny_{style}.safetensors")
    with caplog.at_level(logging.WARNING):
        (lora_model,) = eco.nodes.LoraLoaderModelOnly().load_lora_model_only(text_model, name, LORA_STRENGTH)
        width, height = sizes(text_model)
        with_lora = vd_sample(vd, lora_model, vd.text, width, height)
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(lora_model.patches) == len(deltas)  # every key of the file found its weight
    merged = vd_sample(vd, merged_copy(vd, deltas), vd.text, width, height)
    plain = vd_sample(vd, text_model, vd.text, width, height)
    gap = max_diff(with_lora, merged)
    assert gap <= 1e-5 * max(1.0, merged.abs().max().item()), f"{style} LoRA vs merged delta: max|Δ| = {gap:.2e}"
    change = assert_changed(with_lora, plain, f"{style} LoRA")
    logging.getLogger(__name__).info("%s LoRA: max|Δ| vs merged %.3e, change vs plain %.3e", style, gap, change)
    # The same patched MODEL under core KSampler.
    positive, negative = conditioning(vd, vd.text)
    assert_changed(ksample(eco, lora_model, positive, negative, width, height),
                   ksample(eco, text_model, positive, negative, width, height), f"{style} LoRA under KSampler")


@pytest.mark.parametrize("image_model", ["text", "text+image", "image"])
def test_every_sd15_lora_key_maps_onto_the_full_size_vd_model(eco, ref_dir, image_model):
    """Full size (the official key manifest, weights on the meta device): every key an SD 1.5 LoRA
    can have (kohya, diffusers, LyCORIS) names the same weight, of the same shape, in VD's MODEL."""
    import comfy.lora
    import comfy.model_detection
    import comfy.supported_models

    image_model_module = importlib.import_module("vd_pack.nodes.image_model")
    loader = importlib.import_module("vd_pack.nodes.loader")
    state = {}
    for line in (ref_dir / "vd-four-flow-v1-0.keys.tsv").read_text().splitlines():
        key, shape, *_ = line.split("\t")
        if key.startswith("diffuser."):
            state[key[len("diffuser."):]] = torch.empty([int(n) for n in shape.split(",") if n], device="meta",
                                                        dtype=torch.float16)
    kinds = loader.IMAGE_MODEL_CHOICES[image_model]
    native, config, names = image_model_module.renamed_to_native(state, kinds, config_heads(), "keys.tsv")
    vd_config = image_model_module.image_model_config(native, kinds, config.num_heads, names)
    primary = {k: v for k, v in native.items() if ".secondary." not in k}
    assert type(comfy.model_detection.model_config_from_unet(primary, "")).__name__ == "SD15"
    sd15_config = comfy.supported_models.SD15(dict(SD15_UNET))
    models = []
    for model_config in (sd15_config, vd_config):
        model_config.set_inference_dtype(torch.float16, None)
        models.append(model_config.get_model({}, device="meta"))
    sd15_keys, vd_keys = (comfy.lora.model_lora_keys_unet(m, {}) for m in models)
    assert len(sd15_keys) > 1000
    assert {k: v for k, v in sd15_keys.items() if vd_keys.get(k) != v} == {}
    sd15_shapes, vd_shapes = ({k: v.shape for k, v in m.state_dict().items() if k.startswith("diffusion_model.")}
                              for m in models)
    targets = {t for t in sd15_keys.values() if t in sd15_shapes}  # the key map also names absent skip convs
    assert len(targets) == len(sd15_shapes)  # every SD 1.5 UNet weight is a LoRA target
    assert {t: (sd15_shapes[t], vd_shapes.get(t)) for t in targets if vd_shapes.get(t) != sd15_shapes[t]} == {}


# ------------------------------------------------------- 2. FreeU, SAG, PAG, HyperTile model patches




def test_freeu_acts_on_the_model_widths(text_model):
    """FreeU scales the output blocks of width 2·/4·model_channels: the VD UNet must have some."""
    config = text_model.model.model_config.unet_config
    widths = {config["model_channels"] * m for m in config["channel_mult"]}
    assert widths & {config["model_channels"] * 2, config["model_channels"] * 4}


@pytest.mark.parametrize("name", list(PATCHES))
def test_model_patch_runs_and_changes_the_output(eco, vd, text_model, name):
    size = sizes(text_model)  # SAG needs > 4 latent cells per side, HyperTile ≥ 2 tiles of ≥ 4
    assert min(size) // 8 > 4
    patched = PATCHES[name](text_model, size)
    assert patched is not text_model and not text_model.model_options["transformer_options"].get("patches_replace") \
        and not text_model.model_options.get("sampler_post_cfg_function")  # a clone was patched
    change = assert_changed(vd_sample(vd, patched, vd.text, *size), vd_sample(vd, text_model, vd.text, *size),
                            f"{name} under VD Text to Image")
    positive, negative = conditioning(vd, vd.text)
    k_change = assert_changed(ksample(eco, patched, positive, negative, *size),
                              ksample(eco, text_model, positive, negative, *size), f"{name} under KSampler")
    logging.getLogger(__name__).info("%s: change %.3e (VD sampler), %.3e (KSampler)", name, change, k_change)


@pytest.mark.parametrize("name", list(PATCHES))
def test_model_patch_runs_on_a_mix(vd, mix_model, name):
    """On the text+image MODEL the attention patches see both kinds' context layers in turn."""
    size = sizes(mix_model)
    patched = PATCHES[name](mix_model, size)
    assert_changed(vd_sample(vd, patched, vd.mix, *size), vd_sample(vd, mix_model, vd.mix, *size), f"{name} on a mix")


# ------------------------------------------------------------------------------ 3. ControlNet




def test_sd15_controlnet_applies_to_vd_conditioning(eco, vd, text_model, release_dir):
    control = make_controlnet(text_model)
    hint = comfy_image(release_dir / "expected" / "image_0.png")
    size = sizes(text_model)
    positive, negative = conditioning(vd, vd.text)
    with torch.inference_mode():
        controlled = eco.nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, control, hint, 1.0, 0.0, 1.0)
    plain = vd_sample_conditioning(vd, text_model, positive, negative, *size)
    # Without ControlNet the conditioning route is VD Text to Image itself.
    assert max_diff(plain, vd_sample(vd, text_model, vd.text, *size)) == 0
    change = assert_changed(vd_sample_conditioning(vd, text_model, *controlled, *size), plain, "ControlNet, VD sampler")
    k_change = assert_changed(ksample(eco, text_model, *controlled, *size),
                              ksample(eco, text_model, positive, negative, *size), "ControlNet, KSampler")
    logging.getLogger(__name__).info("ControlNet: change %.3e (VD sampler), %.3e (KSampler)", change, k_change)


# ----------------------------------------------------------------- 4. attention (attn2) patches




def test_attn2_patch_applies_to_the_single_kind_model(vd, text_model):
    seen = []

    def patch(q, k, v, extra_options):  # as IP-Adapter packs do: change the cross-attention's keys/values
        seen.append(extra_options["block"])
        return q, k, v * 0.5

    patched = text_model.clone()
    patched.set_model_attn2_patch(patch)
    size = sizes(text_model)
    change = assert_changed(vd_sample(vd, patched, vd.text, *size), vd_sample(vd, text_model, vd.text, *size),
                            "attn2 patch")
    # Every context layer at every step (cond and uncond run as one batch).
    assert len(seen) == STEPS * count_transformer_blocks(text_model)
    replaced = []

    def replace(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        replaced.append(extra_options["block"])
        return optimized_attention(q, k, -v, extra_options["n_heads"])

    swapped = text_model.clone()
    swapped.set_model_attn2_replace(replace, "input", 1, 0)  # input_blocks.1's first transformer block
    assert_changed(vd_sample(vd, swapped, vd.text, *size), vd_sample(vd, text_model, vd.text, *size), "attn2 replace")
    assert replaced and set(replaced) == {("input", 1)}
    logging.getLogger(__name__).info("attn2 patch: change %.3e", change)


def test_attn2_patch_reaches_both_context_layers_of_a_mix(vd, mix_model):
    """A mix runs every context layer once per context kind: the patch sees both kinds' tokens."""
    token_counts = []
    image_tokens = vd.image[0].cond.shape[1]

    def patch(q, k, v, extra_options):
        token_counts.append(k.shape[1])
        if k.shape[1] == image_tokens:  # only the image context's layers
            v = v * 0.5
        return q, k, v

    patched = mix_model.clone()
    patched.set_model_attn2_patch(patch)
    size = sizes(mix_model)
    text_tokens = vd.text[0].cond.shape[1]
    assert text_tokens != image_tokens, "the test tells the kinds apart by their token counts"
    change = assert_changed(vd_sample(vd, patched, vd.mix, *size), vd_sample(vd, mix_model, vd.mix, *size),
                            "attn2 patch on the image context layers of a mix")
    blocks = count_transformer_blocks(mix_model)
    assert token_counts.count(image_tokens) == token_counts.count(text_tokens) == STEPS * blocks
    logging.getLogger(__name__).info("attn2 patch on a mix's image layers: change %.3e", change)


# -------------------------------------------------------------------- 5. merging and saving


def test_merged_model_saves_and_loads_back_through_the_vd_loader(eco, vd, text_model):
    merging = importlib.import_module("comfy_extras.nodes_model_merging")
    _, deltas = make_lora(text_model, "kohya")
    other = merged_copy(vd, deltas)
    (merged,) = merging.ModelMergeSimple().merge(text_model, other, 0.5)
    size = sizes(text_model)
    expected = vd_sample(vd, merged, vd.text, *size)
    assert_changed(expected, vd_sample(vd, text_model, vd.text, *size), "ModelMergeSimple")
    saver = merging.ModelSave()
    saver.output_dir = str(eco.work / "saved")  # a folder the VD Loader lists (models/versatile_diffusion)
    with torch.inference_mode():
        saver.save(merged, "vd_merged")
    (saved,) = [p.name for p in (eco.work / "saved").glob("vd_merged_*.safetensors")]
    reloaded = load_model(vd.nodes, "text", diffuser=saved)
    gap = max_diff(vd_sample(vd, reloaded, vd.text, *size), expected)
    assert gap == 0, f"saved and reloaded merge: max|Δ| = {gap:.2e}"
    # The file holds only this MODEL's parts; asking it for more names what is missing.
    errors = importlib.import_module("vd_pack.vd_core.errors")
    with pytest.raises(errors.CheckpointError, match="holds no image-context layers.*image_model to 'text'"):
        load_model(vd.nodes, "text+image", diffuser=saved)


def test_checkpoint_of_a_mix_model_with_its_vae_loads_back(eco, vd, mix_model):
    """Save Checkpoint's writer (``comfy.sd.save_checkpoint``; the node itself also wants a core CLIP,
    which VD has not) with the VD VAE: one file the VD Loader reads as diffuser and image VAE."""
    save_checkpoint = importlib.import_module("comfy.sd").save_checkpoint
    with torch.inference_mode():
        vae = vd.nodes["VDLoader"].load("none", "none", "none", "none", "none", "kl-f8.pth", "fp32")[4]
        save_checkpoint(str(eco.work / "saved" / "vd_mix.safetensors"), mix_model, vae=vae)
        reloaded, _, _, _, reloaded_vae = vd.nodes["VDLoader"].load(
            "vd_mix.safetensors", "text+image", "none", "none", "none", "vd_mix.safetensors", "fp32")
    size = sizes(mix_model)
    original = vd_sample(vd, mix_model, vd.mix, *size)
    assert max_diff(vd_sample(vd, reloaded, vd.mix, *size), original) == 0
    with torch.inference_mode():
        pictures = [eco.nodes.VAEDecode().decode(v, {"samples": original})[0] for v in (vae, reloaded_vae)]
    assert max_diff(*pictures) == 0
    # The text+image file also serves an image MODEL (the text-context layers stay on disk).
    image_only = load_model(vd.nodes, "image", diffuser="vd_mix.safetensors")
    assert max_diff(vd_sample(vd, image_only, vd.image, *size),
                    vd_sample(vd, load_model(vd.nodes, "image"), vd.image, *size)) == 0


# ------------------------------------------------------------ 6. what cannot apply says so

UNREACHED = "unpatched image-context layers"


def test_lora_on_a_mix_warns_that_the_image_layers_stay_unpatched(eco, vd, text_model, mix_model, caplog):
    tensors, deltas = make_lora(mix_model, "kohya")
    in_context_layers = sum(".transformer_blocks." in native for native in deltas)  # the rest: ResBlocks
    name = save_lora(eco, tensors, "tiny_mix.safetensors")
    (lora_mix,) = eco.nodes.LoraLoaderModelOnly().load_lora_model_only(mix_model, name, LORA_STRENGTH)
    (lora_text,) = eco.nodes.LoraLoaderModelOnly().load_lora_model_only(text_model, name, LORA_STRENGTH)
    size = sizes(mix_model)
    with caplog.at_level(logging.WARNING):
        text_run = vd_sample(vd, lora_mix, vd.text, *size)
    assert not [r for r in caplog.records if UNREACHED in r.getMessage()]  # text only: the LoRA reaches all
    # On a text context the text+image MODEL is the text MODEL, with the LoRA's native keys valid on both.
    assert max_diff(text_run, vd_sample(vd, lora_text, vd.text, *size)) == 0
    for run in (lambda: vd_sample(vd, lora_mix, vd.mix, *size),
                lambda: ksample(eco, lora_mix, *conditioning(vd, vd.mix), *size),
                lambda: vd_sample(vd, lora_mix, vd.image, *size)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run()
        warned = [r.getMessage() for r in caplog.records if UNREACHED in r.getMessage()]
        assert len(warned) == 1 and f"{in_context_layers} weight patches" in warned[0], caplog.text


def test_lora_on_the_image_model_says_it_patches_image_context_layers(eco, vd, caplog):
    image_model = load_model(vd.nodes, "image")
    tensors, _ = make_lora(image_model, "kohya")
    name = save_lora(eco, tensors, "tiny_image.safetensors")
    (lora_image,) = eco.nodes.LoraLoaderModelOnly().load_lora_model_only(image_model, name, LORA_STRENGTH)
    with caplog.at_level(logging.WARNING):
        vd_sample(vd, lora_image, vd.image, *sizes(image_model))
    assert any("change VD's image-context layers" in r.getMessage() for r in caplog.records), caplog.text
    # Merging two VD image MODELs patches the same layers and is what it looks like: no warning.
    (merged,) = importlib.import_module("comfy_extras.nodes_model_merging").ModelMergeSimple().merge(
        image_model, merged_copy(vd, make_lora(image_model, "kohya")[1], "image"), 0.5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        vd_sample(vd, merged, vd.image, *sizes(image_model))
    assert not [r for r in caplog.records if "image-context layers" in r.getMessage()], caplog.text


def test_sd_conditioning_on_the_vd_model_is_refused_with_the_fix(eco, vd, text_model):
    """CLIP Text Encode's CONDITIONING (tokens + pooled output, no VD keys) must not run silently."""
    errors = importlib.import_module("vd_pack.vd_core.errors")
    tokens = vd.text[0].cond
    sd_conditioning = [[torch.randn_like(tokens), {"pooled_output": torch.randn(tokens.shape[0], tokens.shape[-1])}]]
    size = sizes(text_model)
    with pytest.raises(errors.VDInputError, match="VD Context to Conditioning"):
        ksample(eco, text_model, sd_conditioning, sd_conditioning, *size)
    with pytest.raises(errors.VDInputError, match="CLIP Text Encode"):
        vd_sample_conditioning(vd, text_model, sd_conditioning, sd_conditioning, *size)
