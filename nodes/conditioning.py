"""VD contexts as core CONDITIONING, for the VD image MODEL under KSampler and VD's own samplers.

The conditioning carries the first context's tokens as the CONDITIONING tensor and, as extra keys,
every context's kind (which context layers run), the mixing ratios, and the tokens of the further
contexts. The negative CONDITIONING holds each context's unconditional tokens with the same ratios,
which is VD's multi-context guidance (algorithm.md §4.3, §7.3). The keys reach
`image_model.VDImageModel.extra_conds` and then the UNet as keyword arguments of the same names.

Text-output flows (image→text, text variation) diffuse Optimus text latents, which are not LATENT
images: they stay on the pack's own text sampler nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..vd_core.contexts import GuidedContext
from ..vd_core.errors import VDInputError
from .node_errors import reported_as
from .types import VD_CONTEXT

COND_KINDS = "vd_kinds"  # tuple of "text"/"image", one per context, the first one first
COND_RATIOS = "vd_ratios"  # tuple of float mixing ratios, same order
COND_EXTRA = "vd_extra_contexts"  # list of (B, N_i, D) token tensors of the contexts after the first

NOT_VD_CONDITIONING = (
    "the VD MODEL got a CONDITIONING that did not come from 'VD Context to Conditioning' (for example "
    "from CLIP Text Encode, whose SD text encoder VD cannot read). Connect both KSampler inputs, positive "
    "and negative, to the outputs of 'VD Context to Conditioning'."
)


def conditioning_pair(contexts: Sequence[GuidedContext]) -> tuple[list, list]:
    """Core CONDITIONING ``(positive, negative)`` for a ``VD_CONTEXT``.

    Each is ``[[tokens_0 (B, N_0, D), {vd_kinds, vd_ratios, vd_extra_contexts: [tokens_1, …]}]]``
    with the conditional tokens (positive) or the unconditional ones (negative); contexts of
    strength 0 are left out (they add 0·Δ, algorithm.md §4.3).

    Raises:
        VDInputError: no context, or every context has strength 0.
    """
    if len(contexts) == 0:
        raise VDInputError("the VD_CONTEXT holds no context; connect a CLIP Text/Image Context or a mixer.")
    kept = [c for c in contexts if c.ratio > 0]
    if not kept:
        raise VDInputError("every context has strength 0; give at least one a strength above 0")
    kinds = tuple(c.kind for c in kept)
    ratios = tuple(float(c.ratio) for c in kept)

    def conditioning(tokens: list[torch.Tensor]) -> list:
        extras = {COND_KINDS: kinds, COND_RATIOS: ratios, COND_EXTRA: tokens[1:]}
        return [[tokens[0], extras]]

    return conditioning([c.cond for c in kept]), conditioning([c.uncond for c in kept])


class VDContextToConditioning:
    DISPLAY_NAME = "VD Context to Conditioning"
    SEARCH_ALIASES = ["conditioning", "ksampler", "to conditioning", "positive negative"]
    CATEGORY = "VersatileDiffusion/ComfyUI sampling"
    DESCRIPTION = (
        "Turns a VD context (text, image, or mixed) into core CONDITIONING for KSampler (or Apply "
        "ControlNet) with the VD Loader's MODEL. positive = the contexts, negative = their "
        "unconditional counterparts (negative prompt / zeros), mixed with the same strengths as VD does."
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
