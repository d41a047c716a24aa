"""VD's image flows as a core ComfyUI MODEL and CONDITIONING, for KSampler and the latent tools.

VD's image diffusion uses Stable Diffusion 1.x's noise schedule and latent scale exactly (SPEC §2,
§6.1), so ComfyUI's samplers can drive it once the diffuser is wrapped as an eps-prediction MODEL
with the SD1.5 latent format. KSampler, KSampler (Advanced), denoise for image-to-image, hires-fix
(Latent Upscale → KSampler), noise masks and batch seeds then work on VD.

The conditioning carries the first context's tokens as the CONDITIONING tensor and, as extra keys
(`comfy_bridge.COND_*`), every context's kind (which context layers run), the mixing ratios, and
the tokens of the further contexts. The negative CONDITIONING holds each context's unconditional
tokens with the same ratios, which is VD's multi-context guidance (SPEC §4.3, §7.3).

Text-output flows (image→text, text variation) diffuse Optimus text latents, which are not
LATENT images: they stay on the pack's own sampler nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..vd_core.contexts import GuidedContext
from ..vd_core.diffuser import ContextInput
from ..vd_core.errors import VDInputError
from . import comfy_bridge as bridge
from .node_errors import reported_as, require_part
from .types import VD_CONTEXT, VD_MODEL

CATEGORY = "VersatileDiffusion/ComfyUI sampling"
_NOT_VD_CONDITIONING = (
    "the VD MODEL got a CONDITIONING that did not come from 'VD Context to Conditioning' (for example "
    "from CLIP Text Encode). Connect both KSampler inputs, positive and negative, to the outputs of "
    "'VD Context to Conditioning'."
)


class VDUNetAdapter(torch.nn.Module):
    """The diffusion model ComfyUI's BaseModel calls, translated into a `FourFlowDiffuser` call.

    ``forward(x (B, 4, h, w), timesteps (B,) float in [0, 999], context (B, N, D), vd_kinds,
    vd_ratios, vd_extra_contexts)`` returns ε (B, 4, h, w). ``context`` and each extra context
    may come with their cond/uncond halves concatenated along the batch (ComfyUI batches them when
    shapes allow; a shorter primary is repeated along the tokens, which leaves attention unchanged).
    """

    def __init__(self, diffuser: torch.nn.Module):
        super().__init__()
        self.diffuser = diffuser

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: ComfyUI casts the latent and contexts to it."""
        return next(self.diffuser.parameters()).dtype

    def forward(self, x, timesteps, context=None, control=None, vd_kinds=None, vd_ratios=None,
                vd_extra_contexts=None, **unused):  # unused: transformer_options (SD-UNet patches)
        if vd_kinds is None or context is None:
            raise VDInputError(_NOT_VD_CONDITIONING)
        if control is not None:
            raise VDInputError(
                "ControlNet / T2I-Adapter conditioning cannot steer the VD MODEL (they are built for "
                "Stable Diffusion's UNet); remove the Apply ControlNet node."
            )
        tokens = [context, *(vd_extra_contexts or ())]
        if not len(tokens) == len(vd_kinds) == len(vd_ratios):
            raise VDInputError(
                f"a VD CONDITIONING names {len(vd_kinds)} contexts but carries {len(tokens)} token sets; "
                "it was edited by a node that drops VD's extra keys. " + _NOT_VD_CONDITIONING
            )
        # Another ModelPatcher sharing these weights (the VD sampler nodes') may have offloaded them.
        bridge.ensure_on_device(self.diffuser, x.device)
        contexts = [ContextInput(kind, t, float(r)) for kind, t, r in zip(vd_kinds, tokens, vd_ratios)]
        return self.diffuser(x, timesteps, contexts)


def conditioning_pair(contexts: Sequence[GuidedContext]) -> tuple[list, list]:
    """Core CONDITIONING ``(positive, negative)`` for a ``VD_CONTEXT``.

    Each is ``[[tokens_0 (B, N_0, D), {vd_kinds, vd_ratios, vd_extra_contexts: [tokens_1, …]}]]``
    with the conditional tokens (positive) or the unconditional ones (negative).

    Raises:
        VDInputError: the context tuple is empty.
    """
    if len(contexts) == 0:
        raise VDInputError("the VD_CONTEXT holds no context; connect a CLIP Text/Image Context or a mixer.")
    kinds = tuple(c.kind for c in contexts)
    ratios = tuple(float(c.ratio) for c in contexts)

    def conditioning(tokens: list[torch.Tensor]) -> list:
        extras = {bridge.COND_KINDS: kinds, bridge.COND_RATIOS: ratios, bridge.COND_EXTRA: tokens[1:]}
        return [[tokens[0], extras]]

    return conditioning([c.cond for c in contexts]), conditioning([c.uncond for c in contexts])


class VDModelAsComfyModel:
    DISPLAY_NAME = "VD Model as ComfyUI MODEL"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Wraps the VD diffuser as a core MODEL (Stable Diffusion 1.x noise schedule and latent "
        "format), so KSampler, KSampler (Advanced), hires-fix and the latent nodes make VD images. "
        "Condition it with 'VD Context to Conditioning'. Image outputs only; ControlNet and LoRA do not apply."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("VD's image diffusion as a core MODEL, for KSampler (positive/negative from VD Context to Conditioning).",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vd_model": (VD_MODEL, {"tooltip": "The diffuser from the VD Loader (its vd_model output)."})}}

    def wrap(self, vd_model):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(vd_model, self.DISPLAY_NAME, "diffuser", "diffuser", "vd_model")
            return (bridge.comfy_model(VDUNetAdapter(part.module)),)


class VDContextToConditioning:
    DISPLAY_NAME = "VD Context to Conditioning"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Turns a VD context (text, image, or mixed) into core CONDITIONING for KSampler with the "
        "'VD Model as ComfyUI MODEL'. positive = the contexts, negative = their unconditional "
        "counterparts (negative prompt / zeros), mixed with the same strengths as VD does."
    )
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = (
        "Connect to KSampler's positive input.",
        "Connect to KSampler's negative input (replaces a negative prompt; set it in the context node).",
    )
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"context": (VD_CONTEXT, {
            "tooltip": "A context from VD CLIP Text/Image Context or the Dual Context Mixer."})}}

    def convert(self, context):
        with reported_as(self.DISPLAY_NAME):
            return conditioning_pair(context)
