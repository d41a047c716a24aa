"""The pack's ComfyUI nodes (classic V1 API).

This package must only be imported relatively (``from .nodes import ...``): ComfyUI has a
top-level module of its own called ``nodes``.
"""

from __future__ import annotations

from . import comfy_bridge
from .contexts import VDCLIPImageContext, VDCLIPTextContext, VDDualContextMixer
from .image_tools import VDColorMatch
from .loader import VDLoader
from .conditioning import VDContextToConditioning
from .samplers import VDImageToText, VDImageVariation, VDMultiContextSampler, VDTextToImage, VDTextVariation
from .speed import VDSpeedUp
from .text import VDOptimusTextDecode, VDOptimusTextEncode, VDTextLatentEdit

NODE_CLASSES = (
    VDLoader,
    VDSpeedUp,
    VDCLIPTextContext,
    VDCLIPImageContext,
    VDDualContextMixer,
    VDTextToImage,
    VDImageVariation,
    VDMultiContextSampler,
    VDImageToText,
    VDTextVariation,
    VDOptimusTextDecode,
    VDOptimusTextEncode,
    VDTextLatentEdit,
    VDColorMatch,
    VDContextToConditioning,
)

# The node id is the class name; every class carries its own display name.
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in NODE_CLASSES}

# Model lists are read when ComfyUI asks for node definitions, so the folder must exist by then.
comfy_bridge.register_model_folders()
