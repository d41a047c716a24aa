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

from ..vd_core.clip_loading import load_clip
from ..vd_core.clip_tokenizer import load_clip_tokenizer
from ..vd_core.diffuser import load_diffuser
from ..vd_core.errors import CheckpointError
from ..vd_core.image_vae import load_image_vae
from ..vd_core.optimus import load_optimus
from . import comfy_bridge as bridge
from .node_errors import reported_as
from .types import VD_CLIP, VD_MODEL, VD_OPTIMUS, LoadedPart

log = logging.getLogger(__name__)

NONE = "none"
DTYPE_CHOICES = ["auto", "fp16", "bf16", "fp32"]
VD_FOLDER = "versatile_diffusion"
VAE_FOLDERS = ("vae", VD_FOLDER)
CLIP_FOLDERS = ("clip_vision",)  # the bridge resolves every CLIP choice through this one


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


class VDLoader:
    DISPLAY_NAME = "VD Loader"
    CATEGORY = "VersatileDiffusion/loaders"
    DESCRIPTION = (
        "Loads Versatile Diffusion's parts: the four-flow diffuser (VD_MODEL), CLIP ViT-L/14 for text "
        "and image contexts (VD_CLIP), the Optimus text VAE for text outputs (VD_OPTIMUS) and the kl-f8 "
        "image VAE (a core VAE for VAE Decode/Encode). Set a part to 'none' when no flow needs it."
    )
    RETURN_TYPES = (VD_MODEL, VD_CLIP, VD_OPTIMUS, "VAE")
    RETURN_NAMES = ("vd_model", "vd_clip", "vd_optimus", "vae")
    OUTPUT_TOOLTIPS = (
        "The four-flow diffuser, for the VD sampler nodes.",
        "CLIP ViT-L/14, for the CLIP Text/Image Context nodes.",
        "The Optimus text VAE, for Optimus Text Decode/Encode and Text Latent Edit.",
        "The kl-f8 image VAE as a core VAE: use VAE Decode after the image samplers, VAE Encode for image-to-image.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        vd_files = bridge.list_model_files(VD_FOLDER)
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
                "optimus": (optimus, {"default": optimus_default, "tooltip": (
                    "The Optimus text VAE optimus-vae.pth from models/versatile_diffusion; needed by "
                    "Image to Text, Text Variation and the Optimus nodes. 'none' when only images are made.")}),
                "clip": (clip, {"default": clip_default, "tooltip": (
                    "CLIP ViT-L/14: the openai/clip-vit-large-patch14 folder (or a CLIP-L file with its "
                    "text_projection) in models/clip_vision, models/clip or models/versatile_diffusion.")}),
                "image_vae": (vae, {"default": vae_default, "tooltip": (
                    "The kl-f8 image VAE kl-f8.pth from models/vae or models/versatile_diffusion; "
                    "needed to turn image latents into pictures and back.")}),
                "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": (
                    "Precision of the diffuser, CLIP and Optimus. auto: ComfyUI's choice for the GPU "
                    "(fp16/bf16), fp32 on the CPU. fp16 halves memory (the official WebUI runs in fp16).")}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, diffuser, optimus, clip, image_vae, dtype):
        # ComfyUI already caches unchanged inputs; this adds "the file on disk was replaced".
        return "|".join((
            _fingerprint((VD_FOLDER,), diffuser),
            _fingerprint((VD_FOLDER,), optimus),
            _fingerprint(CLIP_FOLDERS, clip),
            _fingerprint(VAE_FOLDERS, image_vae),
            dtype,
        ))

    def load(self, diffuser, optimus, clip, image_vae, dtype):
        with reported_as(self.DISPLAY_NAME):
            torch_dtype = bridge.pick_dtype(dtype, bridge.compute_device())
            rest = bridge.offload_device()
            model = clip_part = optimus_part = vae = None
            if diffuser != NONE:
                module = load_diffuser(_resolve((VD_FOLDER,), diffuser), dtype=torch_dtype, device=rest)
                model = LoadedPart(module, bridge.managed(module), diffuser)
            if clip != NONE:
                path = _resolve(CLIP_FOLDERS, clip)
                # A single CLIP-L file has no tokenizer beside it: ComfyUI ships the same BPE files.
                folder = path if path.is_dir() else path.parent
                tokenizer = load_clip_tokenizer([folder, *bridge.comfy_tokenizer_dirs()])
                module = load_clip(path, tokenizer=tokenizer, dtype=torch_dtype, device=rest)
                clip_part = LoadedPart(module, bridge.managed(module), clip)
            if optimus != NONE:
                module = load_optimus(_resolve((VD_FOLDER,), optimus), dtype=torch_dtype, device=rest)
                optimus_part = LoadedPart(module, bridge.managed(module), optimus)
            if image_vae != NONE:
                # vd_core validates the file strictly (a wrong file fails here with its key names);
                # ComfyUI's own VAE then serves VAE Decode/Encode, tiled decoding and previews.
                vae = bridge.core_vae(load_image_vae(_resolve(VAE_FOLDERS, image_vae)).state_dict())
            log.info("VD Loader: diffuser=%s clip=%s optimus=%s image_vae=%s dtype=%s",
                     diffuser, clip, optimus, image_vae, torch_dtype)
            return (model, clip_part, optimus_part, vae)
