"""Context nodes: prompts and images → VD_CONTEXT (what the VD samplers are conditioned on).

A ``VD_CONTEXT`` is a tuple of ``GuidedContext`` (``vd_core.contexts``): conditional tokens, the
unconditional tokens guidance contrasts them with, and a mixing ratio (algorithm.md §4.3, §7.3).
"""

from __future__ import annotations

import weakref

from ..vd_core.clip import encoder_from_state_dict
from ..vd_core.errors import MissingPartError
from ..vd_core.flows.context_builders import image_context, mix_contexts, text_context
from . import comfy_bridge as bridge
from .comfy_images import keep_mask_from_comfy, to_vd_images
from .node_errors import reported_as, require_part
from .parts import ManagedModule
from .types import VD_CLIP, VD_CONTEXT, stored_context

CATEGORY = "VersatileDiffusion/conditioning"


class VDCLIPTextContext:
    DISPLAY_NAME = "VD CLIP Text Context"
    SEARCH_ALIASES = ["prompt", "text encode", "clip text encode", "text prompt", "text conditioning"]
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes a prompt with CLIP ViT-L/14 into a text context (77 tokens) for Text to Image, Text "
        "Variation and the mixers. The negative prompt is what guidance steers away from (the "
        "official flows use the empty prompt)."
    )
    RETURN_TYPES = (VD_CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("The text context (prompt as condition, negative prompt as unconditional).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": (VD_CLIP, {"tooltip": "CLIP from the VD Loader (its vd_clip output)."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "What to generate. CLIP reads at most 75 tokens; longer prompts are cut."}),
                "negative": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                        "tooltip": "What to avoid. Empty = the official unconditional context (the empty prompt)."}),
            }
        }

    def encode(self, clip, prompt, negative):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(clip, self.DISPLAY_NAME, "CLIP", "clip", "vd_clip")
            context = text_context(part.use("text"), prompt, negative)
            return ((stored_context(context),),)


class VDCLIPImageContext:
    DISPLAY_NAME = "VD CLIP Image Context"
    SEARCH_ALIASES = ["image prompt", "clip vision encode", "image conditioning", "style", "focus", "variation"]
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes an image with CLIP ViT-L/14 into an image context (257 tokens) for Image Variation, "
        "Image to Text and the mixers. Focus moves between semantic content (0) and style (1); a mask "
        "limits which parts of the image count. Needs CLIP from the VD Loader or a core CLIP Vision "
        "(ViT-L/14) model."
    )
    RETURN_TYPES = (VD_CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("The image context (unconditional: zeros; for Image to Text: a black image).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image (a batch gives one context per image)."}),
                "focus": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "0.5 = the image as it is. Lower keeps the semantic content and drops its main "
                    "style components; higher keeps the style/texture (the WebUI's Focus control).")}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "Scales the context tokens (the WebUI's per-image Weight in Multi-Context); 1 = unchanged.")}),
            },
            "optional": {
                "clip": (VD_CLIP, {"tooltip": "CLIP from the VD Loader. Give this or clip_vision."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": (
                    "A CLIP ViT-L/14 vision model from core Load CLIP Vision, used when no VD CLIP is connected.")}),
                "mask": ("MASK", {"tooltip": (
                    "Optional ComfyUI mask: 1 = masked = left out of the context (VD keeps 1 − mask). "
                    "A mask of another size is resized to the image's size.")}),
            },
        }

    def encode(self, image, focus, weight, clip=None, clip_vision=None, mask=None):
        with reported_as(self.DISPLAY_NAME):
            images = to_vd_images(image)
            keep = None
            if mask is not None:
                keep = keep_mask_from_comfy(mask, images.shape[0], images.shape[2], images.shape[3])
            if clip is not None:
                context = image_context(clip.use("vision"), images, keep, focus=focus, weight=weight)
            elif clip_vision is not None:
                context = image_context(_clip_vision_encoder(clip_vision).use(), images, keep, focus=focus, weight=weight)
            else:
                raise MissingPartError(
                    f"{self.DISPLAY_NAME}: no image encoder is connected. Connect the VD Loader's vd_clip "
                    "output to 'clip' (choose a CLIP in its 'clip' input), or a core Load CLIP Vision "
                    "(ViT-L/14) to 'clip_vision'."
                )
            return ((stored_context(context),),)


# One encoder per core CLIP_VISION object (ComfyUI caches the loader's output between runs).
_CLIP_VISION_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _clip_vision_encoder(clip_vision) -> ManagedModule:
    """VD's encoder over a core CLIP_VISION's weights, built once per CLIP_VISION object.

    ComfyUI's CLIP vision holds transformers-named vision weights; vd_core rebuilds the official
    encoder from them so preprocessing and projection follow algorithm.md §5.2.
    """
    managed = _CLIP_VISION_ENCODERS.get(clip_vision)
    if managed is None:
        encoder = encoder_from_state_dict(clip_vision.get_sd(), clip_vision_config(clip_vision),
                                                     device=bridge.offload_device())
        managed = _CLIP_VISION_ENCODERS[clip_vision] = ManagedModule(encoder, "VD_CLIP_vision_from_CLIP_VISION")
    return managed


def clip_vision_config(clip_vision) -> dict | None:
    """The head count of a core ``CLIP_VISION`` as a ``CLIPConfig``-style dict, or None.

    No file stores the heads; ComfyUI's ``ClipVisionModel`` built its encoder from its own json, so
    its attention layers know them (``model.vision_model.encoder.layers[i].self_attn.heads``).
    Without that, the encoder takes 64-wide heads, which is right for ViT-L/14 (1024 wide, 16 heads).
    """
    try:
        heads = clip_vision.model.vision_model.encoder.layers[0].self_attn.heads
    except (AttributeError, IndexError, TypeError):
        return None
    return {"vision_config": {"num_attention_heads": int(heads)}}


class VDDualContextMixer:
    DISPLAY_NAME = "VD Dual Context Mixer"
    SEARCH_ALIASES = ["dual context", "mix", "blend", "image and text", "multi context", "conditioning combine"]
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Mixes two to four contexts into one: the diffuser attends to each and blends the results by "
        "strength. For the WebUI's Dual-Context with text domination τ, give the text "
        "context strength τ and the image context 1 − τ."
    )
    RETURN_TYPES = (VD_CONTEXT,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("The mixed context, for any VD image or text sampler.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        def strength(default):
            return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Relative strength of this context; strengths are normalised to sum 1 (0.3 and 0.7 "
                "mean the same as 3 and 7).")})

        return {
            "required": {
                "context_1": (VD_CONTEXT, {"tooltip": "First context (e.g. the image context)."}),
                "strength_1": strength(0.7),
                "context_2": (VD_CONTEXT, {"tooltip": "Second context (e.g. the text context)."}),
                "strength_2": strength(0.3),
            },
            "optional": {
                "context_3": (VD_CONTEXT, {"tooltip": "Optional third context."}),
                "strength_3": strength(0.0),
                "context_4": (VD_CONTEXT, {"tooltip": "Optional fourth context."}),
                "strength_4": strength(0.0),
            },
        }

    def mix(self, context_1, strength_1, context_2, strength_2,
            context_3=None, strength_3=0.0, context_4=None, strength_4=0.0):
        with reported_as(self.DISPLAY_NAME):
            pairs = [(context_1, strength_1), (context_2, strength_2), (context_3, strength_3), (context_4, strength_4)]
            given = [(c, s) for c, s in pairs if c is not None]
            mixed = mix_contexts([c for c, _ in given], [s for _, s in given])
            return (tuple(mixed),)
