"""VD's image flows as a ComfyUI ``MODEL`` on ComfyUI's own SD 1.x UNet (needs ComfyUI; imported lazily).

VD's time MLP, image data layers and one kind of context layers are an SD 1.x UNet under other
names (algorithm.md §4.2), and VD uses SD 1.x's noise schedule and latent scale (algorithm.md §2, §6.1). So the
MODEL is built the way ``comfy/sd.py`` builds a diffusion model: SD 1.5's model config with sizes
read off the tensors, a ``BaseModel`` whose UNet is core's ``UNetModel`` (one context kind) or
:class:`~.multi_context_unet.MultiContextUNet` (both kinds), ComfyUI's dtype and casting choices
(fp8 storage, manual casting, ``--lowvram``) and one ModelPatcher that owns the weights. LoRA,
ControlNet, attention patches, FreeU, SAG/PAG, HyperTile, merging and saving then apply to VD.

The CONDITIONING that goes with it comes from `conditioning.py`: every entry names its contexts'
kinds, and `VDImageModel.extra_conds` refuses any other (e.g. CLIP Text Encode's) with a message.
"""

from __future__ import annotations

import logging
import os

import comfy.conds
import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.weight_adapter import WeightAdapterBase

from ..vd_core.checkpoint import check_same_keys
from ..vd_core.diffuser import DiffuserConfig, DiffuserParts, FourFlowDiffuser, read_diffuser_state_dict
from ..vd_core.diffuser.config import RELEASE_NUM_HEADS
from ..vd_core.diffuser.layout import rename_by_prefix, sd_unet_prefixes
from ..vd_core.diffuser.loading import WHAT, check_parts_present, parts_in_state, select_parts
from ..vd_core.errors import VDInputError
from . import comfy_bridge as bridge
from .conditioning import COND_EXTRA, COND_KINDS, COND_RATIOS, NOT_VD_CONDITIONING
from .multi_context_unet import unet_class_for

log = logging.getLogger(__name__)

SECONDARY = "secondary."  # where the second kind's layer sits inside each context layer
# Weight storage choices beyond ComfyUI's automatic one (core's UNETLoader offers the same fp8 ones).
WEIGHT_DTYPES = {
    "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


class VDImageModel(comfy.model_base.BaseModel):
    """SD 1.x's BaseModel, taking only VD conditioning (see `conditioning.py`)."""

    def __init__(self, model_config, *args, **kwargs):
        super().__init__(model_config, *args, **kwargs)
        self.context_kinds = model_config.context_kinds

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)  # the first context's tokens → c_crossattn
        kinds = kwargs.get(COND_KINDS)
        if kinds is None:
            raise VDInputError(NOT_VD_CONDITIONING)
        absent = sorted(set(kinds) - set(self.context_kinds))
        if absent:
            raise VDInputError(
                f"this VD MODEL holds only {' and '.join(self.context_kinds)}-context layers but the "
                f"conditioning has a {' and '.join(absent)} context: set the VD Loader's image_model to "
                f"'{'+'.join(sorted({*self.context_kinds, *absent}, reverse=True))}'"
            )
        if len(self.context_kinds) > 1:
            # Constants only batch with equal values: cond and uncond share kinds and ratios.
            out[COND_KINDS] = comfy.conds.CONDConstant(tuple(kinds))
            out[COND_RATIOS] = comfy.conds.CONDConstant(tuple(kwargs[COND_RATIOS]))
            out[COND_EXTRA] = comfy.conds.CONDList(list(kwargs.get(COND_EXTRA) or []))
        elif len(kinds) > 1:
            raise VDInputError(
                f"this conditioning mixes {len(kinds)} contexts; mixing runs on the multi-context UNet: set the "
                "VD Loader's image_model to 'text+image'"
            )
        return out


class VDImageModelConfig(comfy.supported_models.SD15):
    """SD 1.5's config (schedule, latent format, UNet) with VD's sizes and context kinds.

    ``file_names`` maps the UNet's native names back to the VD file's (``diffuser.image.…``): Save
    Checkpoint / ModelSave then write a VD diffuser file holding exactly this MODEL's parts (the
    context kinds stay explicit, which SD names could not say), which the VD Loader reads back.
    """

    def __init__(self, unet_config: dict, context_kinds: tuple[str, ...], num_heads: int,
                 file_names: dict[str, str]):
        super().__init__(unet_config)
        self.unet_config["num_heads"] = num_heads  # fixed by the release, in no file (algorithm.md §3.3)
        self.context_kinds = context_kinds
        self.file_names = file_names

    def process_unet_state_dict_for_saving(self, state_dict):
        unknown = sorted(set(state_dict) - set(self.file_names))
        if unknown:  # never write a file the VD Loader would refuse, or drop a tensor silently
            raise VDInputError(
                f"cannot save this VD MODEL: its UNet has tensors VD's file layout has no name for "
                f"({', '.join(unknown[:4])}{' …' if len(unknown) > 4 else ''})"
            )
        return {self.file_names[k]: v for k, v in state_dict.items()}

    def get_model(self, state_dict, prefix="", device=None):
        return VDImageModel(self, comfy.model_base.ModelType.EPS, device=device,
                            unet_model=unet_class_for(self.context_kinds))


def context_layer_prefixes(unet: torch.nn.Module) -> list[str]:
    """``diffusion_model.``-prefixed names of the UNet's context layers (``…input_blocks.1.1.``)."""
    return [f"diffusion_model.{name}." for name, module in unet.named_modules()
            if isinstance(module, SpatialTransformer) and ".secondary" not in f".{name}"]


def unreached_patch_warning(model_patcher, kinds_used) -> str | None:
    """What a sampling run's weight patches (LoRA, merges) do not reach, or None.

    SD 1.5 LoRAs and merges with SD models patch the UNet's native names: on a text+image MODEL
    those are the primary kind's context layers only, so a context of the other kind runs through
    unpatched layers; on an image MODEL LoRAs patch VD's image-context layers, which SD never had.
    """
    primary, *_ = kinds = model_patcher.model.context_kinds
    layers = context_layer_prefixes(model_patcher.model.diffusion_model)

    def secondary_name(key):
        layer = next(p for p in layers if key.startswith(p))
        return f"{layer}{SECONDARY}{key[len(layer):]}"

    patched = [k for k in model_patcher.patches if k.startswith(tuple(layers)) and f".{SECONDARY}" not in k]
    others = sorted(set(kinds_used) - {primary})
    unreached = [k for k in patched if secondary_name(k) not in model_patcher.patches]
    if others and len(kinds) > 1 and unreached:
        return (f"VD image MODEL: {len(unreached)} weight patches (LoRA or model merge) change only the "
                f"{primary}-context layers; the {' and '.join(others)} context of this run goes through unpatched "
                f"{' and '.join(others)}-context layers (an SD 1.5 LoRA has none for it)")
    adapters = [k for k in patched if any(isinstance(p[1], WeightAdapterBase) for p in model_patcher.patches[k])]
    if primary == "image" and adapters:  # (merges of VD image MODELs are what they look like)
        return (f"VD image MODEL: {len(adapters)} LoRA weight patches change VD's image-context layers; SD 1.5 "
                "LoRAs were trained for SD's text conditioning, so their effect here is untested")
    return None


def _warn_unreached_patches(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper (VD sampler nodes and KSampler alike): log `unreached_patch_warning`."""
    guider = executor.class_obj
    kinds = {kind for conds in guider.conds.values() for cond in conds for kind in cond.get(COND_KINDS) or ()}
    message = unreached_patch_warning(guider.model_patcher, kinds)
    if message:
        log.warning(message)
    return executor(*args, **kwargs)


def native_state_dict(path: str | os.PathLike, context_kinds: tuple[str, ...], num_heads: int = RELEASE_NUM_HEADS,
                      ) -> tuple[dict[str, torch.Tensor], DiffuserConfig, dict[str, str]]:
    """The image MODEL's tensors of a VD diffuser file under ComfyUI's UNet names.

    The file is checked strictly for the parts asked for (vd_core's loader rules); the first kind's
    context layers take the native names, the second's sit under ``….secondary.``.

    Returns:
        ``({"input_blocks.0.0.weight": …}, config, {native name: the release file's name})``;
        tensors keep the file's dtype.

    Raises:
        CheckpointError: not a VD diffuser, or it lacks a part (the message names keys and the fix).
    """
    return renamed_to_native(read_diffuser_state_dict(path), context_kinds, num_heads, path)


def renamed_to_native(state: dict[str, torch.Tensor], context_kinds: tuple[str, ...], num_heads: int,
                      path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], DiffuserConfig, dict[str, str]]:
    """`native_state_dict` of tensors already read (``FourFlowDiffuser`` keys; ``path`` names them
    in messages). Works on meta tensors too (the full-size structure without its weights)."""
    config = DiffuserConfig.from_state_dict(state, num_heads=num_heads, source=f"{WHAT} {path}")
    parts = DiffuserParts.for_flow("image", list(context_kinds))
    # e.g. a file ModelSave wrote from a text MODEL keeps just that MODEL's layers
    held = [k for k in ("text", "image") if parts_in_state(state).has_context(k)]
    check_parts_present(state, parts, path, f"set the VD Loader's image_model to '{'+'.join(held)}'" if held else None)
    with torch.device("meta"):
        wanted = select_parts(state, FourFlowDiffuser(config, parts), path)
    native, file_names = {}, {}
    for index, kind in enumerate(context_kinds):
        prefixes = sd_unet_prefixes(config.layout, kind)
        if index:  # the second kind: only its context layers, under each layer's ``secondary.``
            prefixes = {vd: sd + SECONDARY for vd, sd in prefixes.items() if ".context_blocks." in vd}
        renamed, _ = rename_by_prefix(wanted, prefixes)
        native.update({new: wanted[old] for old, new in renamed.items()})
        file_names.update({new: f"diffuser.{old}" for old, new in renamed.items()})
    return native, config, file_names


def image_model_config(native: dict[str, torch.Tensor], context_kinds: tuple[str, ...], num_heads: int,
                       file_names: dict[str, str]) -> VDImageModelConfig:
    """The model config of `renamed_to_native`'s output: the UNet's sizes read by ComfyUI's own
    detection from the primary kind's (plain SD 1.x) tensors."""
    primary = {k: v for k, v in native.items() if f".{SECONDARY}" not in k}
    unet_config = comfy.model_detection.detect_unet_config(primary, "")
    return VDImageModelConfig(unet_config, tuple(context_kinds), num_heads, file_names)


def load_image_model(path: str | os.PathLike, context_kinds: tuple[str, ...], weight_dtype: str = "auto",
                     num_heads: int = RELEASE_NUM_HEADS):
    """A ComfyUI ``MODEL`` (ModelPatcher) for VD's image flows with ``context_kinds`` ("text",
    "image", or both: the first is the primary kind, under native names).

    Args:
        weight_dtype: "auto" (ComfyUI's choice for the device, honouring --fp16-unet, --fp8_e4m3fn-unet …)
            or a key of `WEIGHT_DTYPES` (fp8 stores weights in 8 bits and computes in fp16/bf16).
    """
    state, config, file_names = native_state_dict(path, context_kinds, num_heads)
    model_config = image_model_config(state, context_kinds, config.num_heads, file_names)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if weight_dtype == "auto":
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state),
                              supported_dtypes=model_config.supported_inference_dtypes,
                              weight_dtype=comfy.utils.weight_dtype(state))
    elif weight_dtype in WEIGHT_DTYPES:
        dtype = WEIGHT_DTYPES[weight_dtype]
    else:
        raise VDInputError(f"weight dtype must be 'auto' or one of {', '.join(WEIGHT_DTYPES)}, not {weight_dtype!r}")
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state).to(offload_device)
    check_same_keys(model.diffusion_model, state, f"{WHAT} {path}", "VD's image UNet",
                    "The file is damaged or not a VD diffuser: download it again.")
    model.load_model_weights(state, "")
    log.info("VD image MODEL: %s context layers, weights %s (compute %s)", "+".join(context_kinds), dtype,
             manual_cast or dtype)
    patcher = bridge.model_patcher_class()(model, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "vd_unreached_patches",
                                 _warn_unreached_patches)
    return patcher
