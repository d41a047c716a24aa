"""The pack's entry point, node definitions, loader, context, text and image nodes.

Runs inside ComfyUI (``$VD_COMFYUI_DIR``, see node_fixtures.py) on the release-layout miniature
(``tiny_release/``), loaded through the VD Loader; numbers are compared with the official outputs in ``tiny_release/expected``
and ``tiny/`` (tolerances: vd_reference README, "Determinism and tolerances").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close_ref, load_tensors
from node_fixtures import RELEASE_FILES, comfy_image, first_context

EXPECTED_NODES = {
    "VDLoader", "VDCLIPTextContext", "VDCLIPImageContext", "VDDualContextMixer", "VDTextToImage", "VDImageVariation",
    "VDMultiContextSampler", "VDImageToText", "VDTextVariation", "VDOptimusTextDecode", "VDOptimusTextEncode",
    "VDTextLatentEdit", "VDColorMatch",
}
LATENT_SCALE = 0.18215  # algorithm.md §6.1


@pytest.fixture(autouse=True)
def inference_mode():
    with torch.inference_mode():
        yield


# ----------------------------------------------------------------------------- entry point, definitions


def test_pack_imports_without_comfyui():
    """In a fresh interpreter (other tests may stub ComfyUI modules): the root package imports,
    registers every node, and leaves ComfyUI's own top-level ``nodes`` module name alone."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from pack_import import import_pack; "
        "p = import_pack(); print(json.dumps({'ids': sorted(p.NODE_CLASS_MAPPINGS), "
        "'names': sorted(p.NODE_DISPLAY_NAME_MAPPINGS), 'comfy': p.nodes.comfy_bridge.comfy_available(), "
        "'foreign': sorted(m for m in ('nodes', 'folder_paths', 'comfy') if m in sys.modules)}))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=120, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert EXPECTED_NODES <= set(found["ids"]) and found["names"] == found["ids"]
    assert found["comfy"] is False and found["foreign"] == []


def _all_inputs(cls):
    types = cls.INPUT_TYPES()
    return {name: spec for section in ("required", "optional") for name, spec in types.get(section, {}).items()}


def test_every_node_is_fully_described(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("VD"), node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("VD "), node_id
        assert cls.CATEGORY.startswith("VersatileDiffusion/"), node_id
        assert len(cls.DESCRIPTION) > 40, node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple), node_id
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS), node_id
        for name, spec in _all_inputs(cls).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


# ----------------------------------------------------------------------------- loader


def test_loader_outputs_and_image_vae(parts, expected):
    model, text_model, vd_clip, vd_optimus, vae = parts
    assert type(model.model).__name__ == "VDImageModel"  # a core MODEL: ModelPatcher over a BaseModel
    assert type(model.model.diffusion_model).__name__ == "MultiContextUNet"  # text+image was asked for
    diffuser = text_model.module
    assert type(diffuser).__name__ == "FourFlowDiffuser"
    assert diffuser.parts.text_data and not diffuser.parts.image_data  # the image side lives in the MODEL
    assert type(vd_clip).__name__ == "LazyCLIP"
    assert type(vd_optimus.module).__name__ == "OptimusVAE"
    # The VAE output is what core VAE Decode calls: unscaled latent → (B, H, W, 3).
    images = vae.decode(expected["inputs"]["vae_latent"] / LATENT_SCALE)
    assert_close_ref(images, expected["vae"]["decode"].permute(0, 2, 3, 1), 1e-4, "VAE decode")


def test_loader_loads_only_what_is_chosen(nodes, release_models, release_dir):
    from safetensors.torch import load_file

    loader = nodes["VDLoader"]
    model, text_model, clip, *_ = loader.load(RELEASE_FILES["diffuser"], "text", "none", "none",
                                              RELEASE_FILES["clip"], "none", "fp32")
    assert text_model is None and type(model.model.diffusion_model).__name__ == "UNetModel"  # core's own UNet
    # time MLP + image data layers + text context layers, one to one with the file's tensors
    keys = set(model.model.diffusion_model.state_dict())
    file_keys = torch.load(release_dir / RELEASE_FILES["diffuser"], weights_only=True).keys()
    wanted = [k for k in file_keys if k.startswith(("diffuser.image.time_embed.", "diffuser.image.data_blocks.",
                                                    "diffuser.text.context_blocks."))]
    assert len(keys) == len(wanted) and not any("secondary" in k for k in keys)
    assert clip._towers == {}  # no tower until a context node asks for one
    nodes["VDCLIPTextContext"].encode(clip, "a house", "")
    assert set(clip._towers) == {"text"}
    weights = load_file(str(release_dir / RELEASE_FILES["clip"] / "model.safetensors"))
    text_tower = sum(v.numel() for k, v in weights.items()
                     if k.startswith(("text_model.", "text_projection.")) and v.is_floating_point())
    assert sum(p.numel() for p in clip._towers["text"].module.parameters()) == text_tower  # no vision weights


def test_loader_parts_are_optional(nodes):
    assert nodes["VDLoader"].load("none", "text", "image", "none", "none", "none", "auto") == (None,) * 5


def test_loader_reports_missing_and_wrong_files(nodes, pack, release_models):
    errors = pack.vd_core.errors
    with pytest.raises(errors.CheckpointError, match=r"^VD Loader: .*no-such-file\.pth"):
        nodes["VDLoader"].load("no-such-file.pth", "text", "none", "none", "none", "none", "auto")
    with pytest.raises(errors.CheckpointError, match=r"^VD Loader: "):  # the VAE file is not a diffuser
        nodes["VDLoader"].load(RELEASE_FILES["image_vae"], "text", "none", "none", "none", "none", "auto")


def test_loader_is_changed_follows_inputs(pack, release_models):
    loader = pack.NODE_CLASS_MAPPINGS["VDLoader"]
    args = dict(diffuser=RELEASE_FILES["diffuser"], image_model="text", text_model="none", optimus="none",
                clip="none", image_vae=RELEASE_FILES["image_vae"], dtype="fp32")
    assert loader.IS_CHANGED(**args) == loader.IS_CHANGED(**args)
    for change in ({"dtype": "fp16"}, {"image_vae": "none"}, {"image_model": "image"}, {"text_model": "text"}):
        assert loader.IS_CHANGED(**args) != loader.IS_CHANGED(**{**args, **change}), change


# ----------------------------------------------------------------------------- contexts


def test_text_context_matches_official(nodes, parts, expected):
    prompts = expected["json"]["clip"]["prompts"]
    context = first_context(nodes["VDCLIPTextContext"].encode(parts[2], prompts[0], ""))
    assert context.kind == "text"
    assert_close_ref(context.cond, expected["clip"]["text_ctx"][:1], 1e-4, "text cond")
    assert_close_ref(context.uncond, expected["clip"]["text_ctx_empty"], 1e-4, "empty-prompt uncond")


def test_image_context_matches_official(nodes, parts, expected, release_dir):
    node = nodes["VDCLIPImageContext"]
    for i in range(expected["clip"]["image_ctx"].shape[0]):  # the official resize + centre crop of each
        context = first_context(node.encode(comfy_image(release_dir / "expected" / f"image_{i}.png"), 0.5, 1.0, clip=parts[2]))
        assert context.kind == "image"
        assert_close_ref(context.cond, expected["clip"]["image_ctx"][i : i + 1], 1e-4, f"image {i} cond")
        assert torch.count_nonzero(context.uncond) == 0  # algorithm.md §8: zeros for image variation
        assert_close_ref(context.text_flow_uncond, expected["clip"]["image_ctx_black"], 1e-4, "black-image uncond")


def test_comfy_mask_is_inverted(nodes, parts, expected, release_dir, pack):
    """ComfyUI MASK 1 = masked = left out; VD keeps 1 − mask (algorithm.md §5.3)."""
    node = nodes["VDCLIPImageContext"]
    image = comfy_image(release_dir / "expected" / "image_0.png")

    def cond(mask):
        return first_context(node.encode(image, 0.5, 1.0, clip=parts[2], mask=mask)).cond[0]

    height, width = image.shape[1:3]
    nothing_masked = cond(torch.zeros(1, height, width))
    assert_close_ref(nothing_masked[None], expected["clip"]["image_ctx"][:1], 1e-4, "mask of zeros")
    assert torch.count_nonzero(cond(torch.ones(height, width))) == 0  # everything masked
    grid = math.isqrt(nothing_masked.shape[0] - 1)  # patch tokens after the global one (16×16 for ViT-L/14)
    for size in (height, height // 2):  # a mask of another size is resized to the image
        left = torch.zeros(1, size, size * width // height)
        left[:, :, : left.shape[2] // 2] = 1.0
        patches = cond(left)[1:].reshape(grid, grid, -1)
        assert torch.count_nonzero(patches[:, : grid // 2 - 1]) == 0, "masked (left) patches must be removed"
        assert bool((patches[:, grid // 2 + 1 :].abs().sum(-1) > 0).all()), "unmasked (right) patches must stay"
    with pytest.raises(pack.vd_core.errors.VDInputError, match=r"^VD CLIP Image Context: .*mask batch"):
        cond(torch.zeros(3, height, width))


def test_image_context_needs_an_encoder(nodes, pack, release_dir):
    image = comfy_image(release_dir / "expected" / "image_0.png")
    with pytest.raises(pack.vd_core.errors.MissingPartError, match=r"^VD CLIP Image Context: .*'clip'"):
        nodes["VDCLIPImageContext"].encode(image, 0.5, 1.0)


def test_dual_context_mixer_sets_ratios(nodes, parts, release_dir):
    text = nodes["VDCLIPTextContext"].encode(parts[2], "a house", "")[0]
    image = nodes["VDCLIPImageContext"].encode(comfy_image(release_dir / "expected" / "image_0.png"), 0.5, 1.0, clip=parts[2])[0]
    (mixed,) = nodes["VDDualContextMixer"].mix(image, 0.7, text, 0.3)
    assert [(c.kind, round(c.ratio, 6)) for c in mixed] == [("image", 0.7), ("text", 0.3)]
    (only_image,) = nodes["VDDualContextMixer"].mix(image, 1.0, text, 0.0, context_3=None)
    assert [c.kind for c in only_image] == ["image"]


# ----------------------------------------------------------------------------- text nodes


def test_optimus_decode_greedy_matches_official(nodes, parts, expected):
    node = nodes["VDOptimusTextDecode"]
    assert node.OUTPUT_NODE
    out = node.decode(parts[3], expected["inputs"]["optimus_latents"], "greedy", 1.0, 0, 30, False)
    official = expected["json"]["optimus"]["greedy"]["strings"]
    assert out["result"] == ("\n".join(official),)
    assert out["ui"] == {"text": ["\n".join(official)]}


def test_optimus_decode_sampling_is_seeded_per_sentence(nodes, parts, expected):
    node, latents = nodes["VDOptimusTextDecode"], expected["inputs"]["optimus_latents"]
    both = node.decode(parts[3], latents, "sample", 1.0, 7, 30, True)["result"][0].split("\n")
    second = node.decode(parts[3], latents[1:], "sample", 1.0, 8, 30, True)["result"][0]
    assert len(both) == 2 and all(isinstance(s, str) for s in both)
    assert both[1] == second  # sentence i uses seed + i


def test_optimus_encode_matches_official(nodes, parts, expected):
    texts = expected["json"]["optimus"]["encode_texts"]
    (latents,) = nodes["VDOptimusTextEncode"].encode(parts[3], "\n".join(texts) + "\n\n")
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    assert_close_ref(latents, expected["optimus"]["encode_latent"], 1e-4, "Optimus encode")


def test_text_latent_edit_follows_spec(nodes, parts, expected, pack):
    """algorithm.md §10 step 3: remove each latent's projection on n/‖n‖, then add p."""
    z = expected["inputs"]["optimus_latents"]
    (p,) = nodes["VDOptimusTextEncode"].encode(parts[3], "a tall castle")
    (n,) = nodes["VDOptimusTextEncode"].encode(parts[3], "a white house")
    (edited,) = nodes["VDTextLatentEdit"].edit(parts[3], z, "a tall castle", "a white house")
    unit = n[0] / n[0].norm()
    assert_close_ref(edited, z - (z @ unit)[:, None] * unit + p, 1e-5, "edited latents")
    (only_added,) = nodes["VDTextLatentEdit"].edit(parts[3], z, "a tall castle", "")
    assert_close_ref(only_added, z + p, 1e-5, "no negative")
    with pytest.raises(pack.vd_core.errors.VDInputError, match=r"^VD Text Latent Edit: "):
        nodes["VDTextLatentEdit"].edit(parts[3], z, " ", "a white house")


def test_text_nodes_name_the_missing_loader_input(nodes, pack, expected):
    with pytest.raises(pack.vd_core.errors.MissingPartError, match=r"^VD Optimus Text Decode: .*'optimus'"):
        nodes["VDOptimusTextDecode"].decode(None, expected["inputs"]["optimus_latents"], "greedy", 1.0, 0, 30, True)


# ----------------------------------------------------------------------------- image tools


def test_color_match_matches_official(nodes, tiny_dir):
    inputs, official = load_tensors(tiny_dir / "inputs.safetensors"), load_tensors(tiny_dir / "color_adjust.safetensors")
    (out,) = nodes["VDColorMatch"].match(inputs["ca_imout"].permute(0, 2, 3, 1), inputs["ca_cx"].permute(0, 2, 3, 1))
    assert out.shape == inputs["ca_imout"].permute(0, 2, 3, 1).shape
    assert_close_ref(out, official["simple"].permute(0, 2, 3, 1), 1e-5, "Simple colour adjustment")


def test_loader_resolves_every_clip_choice_it_lists(nodes, pack, release_models, comfy_models, release_dir, tmp_path):
    """A CLIP in models/clip (ComfyUI's text_encoders) is listed and also loads, as a folder or a file."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "my-clip-l").symlink_to(release_dir / RELEASE_FILES["clip"], target_is_directory=True)
    (folder / "my-clip-l.safetensors").symlink_to(release_dir / RELEASE_FILES["clip"] / "model.safetensors")
    (folder / "config.json").symlink_to(release_dir / RELEASE_FILES["clip"] / "config.json")  # the tiny heads
    comfy_models("text_encoders", folder)
    choices = pack.nodes.comfy_bridge.list_clip_choices()
    assert {"my-clip-l", "my-clip-l.safetensors"} <= set(choices)
    assert "my-clip-l/model.safetensors" not in choices  # the folder is one choice
    assert choices == nodes["VDLoader"].INPUT_TYPES()["required"]["clip"][0][:-1]  # then "none"
    for choice in ("my-clip-l", "my-clip-l.safetensors"):
        clip = nodes["VDLoader"].load("none", "none", "none", "none", choice, "none", "fp32")[2]
        context = first_context(nodes["VDCLIPTextContext"].encode(clip, "a house", ""))
        assert context.cond.shape[1] == 77
