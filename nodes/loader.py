"""VD Loader: reads the four released files into the pack's model sockets.

The released model comes as four downloads (vd_reference README, "tiny_release"): the diffuser
``vd-four-flow-v1-0-fp16.pth`` and the Optimus text VAE ``optimus-vae.pth`` (folder
``models/versatile_diffusion``), the kl-f8 image VAE ``kl-f8.pth`` (``models/vae`` or
``models/versatile_diffusion``) and CLIP ViT-L/14 (an ``openai/clip-vit-large-patch14`` folder or
a single CLIP-L file). Each part is optional: a flow only needs some of them.
"""

from __future__ import annotations

import logging
import os

from ..vd_core.clip import load_clip
from ..vd_core.clip import load_clip_tokenizer
from ..vd_core.diffuser import DiffuserParts, load_diffuser
from ..vd_core.errors import CheckpointError, VDError, VDInputError
from ..vd_core.image_vae import load_image_vae
from ..vd_core.optimus import load_optimus
from . import comfy_bridge as bridge
from .comfy_vae import core_vae
from .node_errors import reported_as
from .types import VD_CLIP, VD_MODEL, VD_OPTIMUS, LazyCLIP, LoadedPart

log = logging.getLogger(__name__)

NONE = "none"
DTYPE_CHOICES = ["auto", "fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]
VAE_FOLDERS = ("vae", bridge.VD_FOLDER)
# Context layers of each model, by widget choice; the first kind of a pair is the image MODEL's
# primary kind (native names: SD 1.5 LoRAs were trained on text conditioning).
IMAGE_MODEL_CHOICES = {"text": ("text",), "image": ("image",), "text+image": ("text", "image"), NONE: ()}
TEXT_MODEL_CHOICES = {NONE: (), "image": ("image",), "text": ("text",), "text+image": ("text", "image")}


def _choices(files: list[str], hint: str) -> tuple[list[str], str]:
    """Combo choices (the files, then "none") and the default: the first file naming ``hint``."""
    preferred = [f for f in files if hint in os.path.basename(f).lower()]
    default = (preferred or files or [NONE])[0]
    return list(files) + [NONE], default


def _resolve(folders: tuple[str, ...], name: str):
    """The path of ``name`` in the first of ``folders`` that has it (one combo lists several
    folders); the last folder's ``CheckpointError`` when none has it."""
    for folder in folders[:-1]:
        try:
            return bridge.resolve_model_path(folder, name)
        except CheckpointError:
            continue
    return bridge.resolve_model_path(folders[-1], name)


def _fingerprint(folders: tuple[str, ...], name: str) -> str:
    """``name`` plus its resolved path, size and modification time: a replaced file reloads."""
    if name == NONE:
        return NONE
    try:
        path = _resolve(folders, name)
        stat = os.stat(path)
    except (CheckpointError, OSError):
        return f"{name}:missing"  # the load itself reports the missing file
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _clip_tower_loader(path, dtype):
    """``load(tower)`` for `LazyCLIP`: one tower of the CLIP at ``path`` (the text tower with its
    tokenizer; a single CLIP-L file has none beside it, and ComfyUI ships the same BPE files)."""

    def load(tower: str):
        tokenizer = None
        if tower == "text":
            folder = path if path.is_dir() else path.parent
            tokenizer = load_clip_tokenizer([folder, *bridge.comfy_tokenizer_dirs()])
        return load_clip(path, tokenizer=tokenizer, dtype=dtype, device=bridge.offload_device(), towers=(tower,))

    return load


def _image_model(path, kinds: tuple[str, ...], dtype: str):
    """The image flows' core MODEL: VD's image layers on ComfyUI's own SD 1.x UNet."""
    if not bridge.comfy_available():
        raise VDError(
            "the image MODEL is built on ComfyUI's own UNet and only exists inside ComfyUI; outside it use "
            "vd_core's flows (python -m vd_core), or set image_model to 'none'"
        )
    from .image_model import load_image_model

    return load_image_model(path, kinds, dtype)


class VDLoader:
    DISPLAY_NAME = "VD Loader"
    SEARCH_ALIASES = ["versatile diffusion", "vd", "load model", "checkpoint loader", "loader"]
    CATEGORY = "VersatileDiffusion/loaders"
    DESCRIPTION = (
        "Loads the parts of Versatile Diffusion a graph uses: the image flows as a core MODEL (ComfyUI's "
        "own SD 1.x UNet, so LoRA, ControlNet and model patches apply), the text flows' diffuser "
        "(VD_MODEL), CLIP ViT-L/14 (each tower loads when first used), the Optimus text VAE and the kl-f8 "
        "image VAE. Set what no flow of the graph needs to 'none'."
    )
    RETURN_TYPES = ("MODEL", VD_MODEL, VD_CLIP, VD_OPTIMUS, "VAE")
    RETURN_NAMES = ("model", "text_model", "vd_clip", "vd_optimus", "vae")
    OUTPUT_TOOLTIPS = (
        "VD's image diffusion as a core MODEL: for VD Text to Image / Image Variation / Multi Context "
        "Sampler, or core KSampler with VD Context to Conditioning. LoRA/patch nodes may sit between.",
        "The text-flow diffuser, for VD Image to Text and VD Text Variation.",
        "CLIP ViT-L/14, for the CLIP Text/Image Context nodes.",
        "The Optimus text VAE, for Optimus Text Decode/Encode and Text Latent Edit.",
        "The kl-f8 image VAE as a core VAE: use VAE Decode after the image samplers, VAE Encode for image-to-image.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        vd_files = bridge.list_model_files(bridge.VD_FOLDER)
        vae_files = sorted(set(bridge.list_model_files("vae")) | set(vd_files))
        diffuser, diffuser_default = _choices(vd_files, "four-flow")
        optimus, optimus_default = _choices(vd_files, "optimus")
        clip, clip_default = _choices(bridge.list_clip_choices(), "clip")
        vae, vae_default = _choices(vae_files, "kl-f8")
        return {
            "required": {
                "diffuser": (diffuser, {"default": diffuser_default, "tooltip": (
                    "The four-flow diffuser from models/versatile_diffusion (vd-four-flow-v1-0-fp16.pth, "
                    "or a .safetensors converted with `python -m vd_core.convert`). 'none': no sampling.")}),
                "image_model": (list(IMAGE_MODEL_CHOICES), {"default": "text", "tooltip": (
                    "Which context layers the image MODEL holds: 'text' for text→image (0.86 B parameters), "
                    "'image' for image variation, 'text+image' for dual/multi-context mixing (and any mix of "
                    "several contexts), 'none' when no image is made.")}),
                "text_model": (list(TEXT_MODEL_CHOICES), {"default": NONE, "tooltip": (
                    "Which context layers the text-flow diffuser holds: 'image' for Image to Text, 'text' for "
                    "Text Variation, 'text+image' for both or mixed contexts, 'none' when no text is made.")}),
                "optimus": (optimus, {"default": optimus_default, "tooltip": (
                    "The Optimus text VAE optimus-vae.pth from models/versatile_diffusion; needed by "
                    "Image to Text, Text Variation and the Optimus nodes. 'none' when only images are made.")}),
                "clip": (clip, {"default": clip_default, "tooltip": (
                    "CLIP ViT-L/14: the openai/clip-vit-large-patch14 folder (or a CLIP-L file with its "
                    "text_projection) in models/clip_vision, models/clip or models/versatile_diffusion. "
                    "Its text and vision towers load only when a context node first uses them.")}),
                "image_vae": (vae, {"default": vae_default, "tooltip": (
                    "The kl-f8 image VAE kl-f8.pth from models/vae or models/versatile_diffusion; "
                    "needed to turn image latents into pictures and back.")}),
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": (
                    "Precision of the weights. auto: ComfyUI's choice for the device (honours --fp16-unet, "
                    "--fp8_e4m3fn-unet …), fp32 on the CPU. fp16 halves memory (the official WebUI runs in "
                    "fp16). fp8 stores the image MODEL's weights in 8 bits (computed in fp16/bf16); the other "
                    "parts then use auto.")}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, diffuser, image_model, text_model, optimus, clip, image_vae, dtype):
        # ComfyUI already caches unchanged inputs; this adds "the file on disk was replaced".
        return "|".join((
            _fingerprint((bridge.VD_FOLDER,), diffuser), image_model, text_model,
            _fingerprint((bridge.VD_FOLDER,), optimus),
            _fingerprint(bridge.CLIP_FOLDERS, clip),
            _fingerprint(VAE_FOLDERS, image_vae),
            dtype,
        ))

    def load(self, diffuser, image_model, text_model, optimus, clip, image_vae, dtype):
        with reported_as(self.DISPLAY_NAME):
            image_kinds, text_kinds = _kinds(IMAGE_MODEL_CHOICES, "image_model", image_model), \
                _kinds(TEXT_MODEL_CHOICES, "text_model", text_model)
            parts_dtype = bridge.pick_dtype("auto" if dtype.startswith("fp8") else dtype, bridge.compute_device())
            rest = bridge.offload_device()
            model = text_part = clip_part = optimus_part = vae = None
            if diffuser != NONE:
                path = _resolve((bridge.VD_FOLDER,), diffuser)
                if image_kinds:
                    model = _image_model(path, image_kinds, dtype)
                if text_kinds:
                    module = load_diffuser(path, DiffuserParts.for_flow("text", text_kinds), dtype=parts_dtype, device=rest)
                    text_part = LoadedPart.manage(module, "VD_text_flow_diffuser", diffuser)
            if clip != NONE:
                path = _resolve(bridge.CLIP_FOLDERS, clip)
                clip_part = LazyCLIP(path, clip, _clip_tower_loader(path, parts_dtype))
            if optimus != NONE:
                module = load_optimus(_resolve((bridge.VD_FOLDER,), optimus), dtype=parts_dtype, device=rest)
                optimus_part = LoadedPart.manage(module, "VD_Optimus_text_VAE", optimus)
            if image_vae != NONE:
                # vd_core validates the file strictly (a wrong file fails here with its key names);
                # ComfyUI's own VAE then serves VAE Decode/Encode, tiled decoding and previews.
                vae = core_vae(load_image_vae(_resolve(VAE_FOLDERS, image_vae)).state_dict())
            log.info("VD Loader: diffuser=%s image_model=%s text_model=%s clip=%s optimus=%s image_vae=%s dtype=%s",
                     diffuser, image_model, text_model, clip, optimus, image_vae, dtype)
            return (model, text_part, clip_part, optimus_part, vae)


def _kinds(choices: dict, widget: str, value: str) -> tuple[str, ...]:
    if value not in choices:
        raise VDInputError(f"{widget} must be one of {', '.join(choices)}, not {value!r}")
    return choices[value]
