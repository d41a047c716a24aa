"""Optimus text nodes: text latents ↔ sentences, and editing text latents (algorithm.md §6.2, §8.3, §10)."""

from __future__ import annotations

import torch

from ..vd_core.errors import VDInputError
from ..vd_core.flows.edit_image_with_text import edit_text_latents
from ..vd_core.flows.result import decode_texts
from ..vd_core.samplers import PerItemNoise
from ..vd_core.validation import check_seed
from .node_errors import reported_as, require_part
from .types import MAX_SEED, STORAGE_DEVICE, VD_OPTIMUS, VD_TEXT_LATENT

CATEGORY = "VersatileDiffusion/text"
DECODE_MODES = ["sample", "greedy"]


def _optimus_input():
    return (VD_OPTIMUS, {"tooltip": "The Optimus text VAE from the VD Loader (its vd_optimus output)."})


def _sentences(text: str) -> list[str]:
    """One sentence per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class VDOptimusTextDecode:
    DISPLAY_NAME = "VD Optimus Text Decode"
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["caption", "img2txt", "image to text", "text decode", "optimus", "show text", "sentences"]
    DESCRIPTION = (
        "Turns text latents into sentences with Optimus' GPT-2 decoder, one line per latent, and shows "
        "them on the node after a run (no Preview Any needed). 'sample' is the official mode; 'greedy' "
        "always picks the likeliest word."
    )
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("The sentences, one per line (connect to a prompt to reuse them).",)
    FUNCTION = "decode"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "optimus": _optimus_input(),
                "text_latent": (VD_TEXT_LATENT, {"tooltip": "Text latents from VD Image to Text, Text Variation or Text Latent Edit."}),
                "mode": (DECODE_MODES, {"default": "sample", "tooltip": (
                    "sample: draw each word from the model's distribution (official); greedy: deterministic.")}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 2.0, "step": 0.05, "tooltip": (
                    "Sampling temperature (official: 1). Lower = safer, more repetitive sentences.")}),
                "seed": ("INT", {"default": 20, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the word sampling; sentence i uses seed + i (unused by greedy)."}),
                "max_tokens": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": (
                    "Most GPT-2 tokens (word pieces) per sentence (official: 30).")}),
                "clean_up": ("BOOLEAN", {"default": True, "tooltip": (
                    "Remove immediately repeated words and phrases, as the official WebUI does.")}),
            }
        }

    def decode(self, optimus, text_latent, mode, temperature, seed, max_tokens, clean_up):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(optimus, self.DISPLAY_NAME, "Optimus text VAE", "optimus", "vd_optimus")
            model = part.use()
            latents = text_latent.to(next(model.parameters()))
            # Sentence i draws from its own generator (seed + i), like the samplers' batch items.
            seed = check_seed(seed)
            noise = PerItemNoise([seed + i for i in range(latents.shape[0])])
            sentences = decode_texts(model, latents, noise, clean_up, temperature=temperature, greedy=(mode == "greedy"),
                                     max_length=max_tokens)
            text = "\n".join(sentences)
            return {"ui": {"text": [text]}, "result": (text,)}


class VDOptimusTextEncode:
    DISPLAY_NAME = "VD Optimus Text Encode"
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["text encode", "optimus", "text latent", "sentence embedding"]
    DESCRIPTION = "Encodes sentences (one per line) into Optimus text latents (the posterior mean)."
    RETURN_TYPES = (VD_TEXT_LATENT,)
    RETURN_NAMES = ("text_latent",)
    OUTPUT_TOOLTIPS = ("One text latent per non-empty line.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "optimus": _optimus_input(),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "Sentences, one per line."}),
            }
        }

    def encode(self, optimus, text):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(optimus, self.DISPLAY_NAME, "Optimus text VAE", "optimus", "vd_optimus")
            sentences = _sentences(text)
            if not sentences:
                raise VDInputError(f"{self.DISPLAY_NAME}: the text is empty; write at least one sentence")
            latents = part.use().encode(sentences)
            return (latents.to(STORAGE_DEVICE, torch.float32),)


class VDTextLatentEdit:
    DISPLAY_NAME = "VD Text Latent Edit"
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["i2t2i", "edit caption", "text edit", "image editing", "semantic edit", "optimus"]
    DESCRIPTION = (
        "Edits text latents as the official I2T2I did: removes each latent's component along "
        "the negative sentence's latent and adds the positive sentence's latent. Decode the result and "
        "use it as a prompt to make the edited image."
    )
    RETURN_TYPES = (VD_TEXT_LATENT,)
    RETURN_NAMES = ("text_latent",)
    OUTPUT_TOOLTIPS = ("The edited text latents, one per input latent.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "optimus": _optimus_input(),
                "text_latent": (VD_TEXT_LATENT, {"tooltip": "Text latents to edit, e.g. from VD Image to Text."}),
                "positive": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What the result should show, as a short phrase (e.g. 'a tall castle'); its latent is added.")}),
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "What to remove from the description (e.g. 'a white house'); empty removes nothing.")}),
            }
        }

    def edit(self, optimus, text_latent, positive, negative):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(optimus, self.DISPLAY_NAME, "Optimus text VAE", "optimus", "vd_optimus")
            if not positive.strip():
                raise VDInputError(f"{self.DISPLAY_NAME}: the positive text is empty; write what the result should show")
            model = part.use()
            negative_latent = model.encode([negative.strip()]) if negative.strip() else None
            positive_latent = model.encode([positive.strip()])
            edited = edit_text_latents(text_latent.to(positive_latent), negative_latent, positive_latent)
            return (edited.to(STORAGE_DEVICE, torch.float32),)
