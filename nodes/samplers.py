"""VD's own sampler nodes, one per flow (algorithm.md §7, §8).

Image flows return a core ``LATENT`` (``{"samples": unscaled (B, 4, H/8, W/8)}``, the convention
of VAE Decode and KSampler); text flows return ``VD_TEXT_LATENT`` for the Optimus nodes.

Every batch item has its own noise generator, seeded ``seed + batch_index[i]`` (``batch_index``
defaults to 0…B−1), so any item can be re-made alone: picked with Latent From Batch (which keeps
``batch_index``), or as a batch of one with seed ``seed + i``.
"""

from __future__ import annotations

import logging

import torch

from ..vd_core.contexts import GuidedContext
from ..vd_core.errors import MissingPartError, VDInputError
from ..vd_core.flows.multi_context import join_image_contexts
from ..vd_core.flows.options import SAMPLER_NAMES, SCHEDULER_NAMES, SamplingOptions
from ..vd_core.flows.sampling import check_image_size, sample_text
from ..vd_core.memory_budget import check_image_run_fits
from ..vd_core.samplers import PerItemNoise
from ..vd_core.validation import check_finite, check_result, check_seed
from . import comfy_bridge as bridge
from .node_errors import reported_as
from .types import MAX_SEED, STORAGE_DEVICE, VD_CONTEXT, VD_MODEL, VD_TEXT_LATENT

log = logging.getLogger(__name__)

MAX_SIZE = 8192


IMAGE_MODEL_INPUT = ("MODEL", {"tooltip": (
    "The VD Loader's model output (VD's image diffusion; LoRA and model-patch nodes may sit between).")})
TEXT_MODEL_INPUT = (VD_MODEL, {"tooltip": "The VD Loader's text_model output (the text-flow diffuser)."})


def sampling_inputs(model_input: tuple, context_tooltip: str) -> dict:
    """The inputs every VD sampler shares (defaults: the official WebUI's, algorithm.md §8)."""
    return {
        "model": model_input,
        "context": (VD_CONTEXT, {"tooltip": context_tooltip}),
        "seed": ("INT", {"default": 20, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": (
            "Random seed. Batch item i uses seed + i (seed + batch_index[i] for a latent that carries one).")}),
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": (
            "Sampler steps (official: 50). DDIM with a count that does not divide 1000 runs a few more, as the official sampler does.")}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip": (
            "Classifier-free guidance scale (official: 7.5); 1 runs the model once without guidance.")}),
        "sampler": (list(SAMPLER_NAMES), {"default": "ddim", "tooltip": (
            "ddim is the exact official sampler; euler, euler_ancestral and dpmpp_2m are k-diffusion samplers.")}),
        "scheduler": (list(SCHEDULER_NAMES), {"default": "uniform", "tooltip": (
            "Noise-level spacing for the k-diffusion samplers (DDIM always uses the official uniform steps).")}),
        "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
            "DDIM eta: 0 = deterministic (official). Ignored by the other samplers; euler_ancestral uses 1, as in "
            "ComfyUI.")}),
    }


def _options(seed, steps, cfg, sampler, scheduler, eta, callback) -> SamplingOptions:
    return SamplingOptions(
        steps=steps, guidance=cfg, sampler=sampler, scheduler=scheduler, eta=eta if sampler == "ddim" else None, seed=seed,
        per_item_seeds=True, callback=callback, cancel=bridge.cancel_check(),
    )


def item_noise(seed: int, batch_index) -> PerItemNoise:
    """One generator per batch item, seeded ``seed + batch_index[i]`` (vd_core's seed rule: the
    whole 0…2⁶⁴−1 range of ComfyUI's widget, sums wrapping around)."""
    seed = check_seed(seed)
    return PerItemNoise([seed + int(b) for b in batch_index])


def require_text_model(model, display_name: str):
    """The text-flow diffuser, or a `MissingPartError` naming the VD Loader widgets to set."""
    if model is None:
        raise MissingPartError(
            f"{display_name}: no text-flow diffuser is loaded. In the VD Loader choose a diffuser and set "
            "text_model to the context you use ('image' for Image to Text, 'text' for Text Variation), then "
            "connect its text_model output here."
        )
    return model


def _latent_batch(latent: dict, display_name: str) -> tuple[torch.Tensor, list[int]]:
    """The samples of a core LATENT and its batch indices (0…B−1 when it carries none)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise VDInputError(
            f"{display_name}: the latent must be a 4-channel image latent (B, 4, H/8, W/8), got {shape}; "
            "make it with VAE Encode (VD Loader's vae) or Empty Latent Image"
        )
    check_finite(samples, f"{display_name}: the latent's samples", "make it again with VAE Encode or Empty Latent Image")
    batch_index = list(latent.get("batch_index") or range(samples.shape[0]))
    if len(batch_index) != samples.shape[0]:
        raise VDInputError(
            f"{display_name}: the latent has {samples.shape[0]} items but {len(batch_index)} batch indices; "
            "pass it through the batch nodes unchanged"
        )
    return samples, batch_index


class _ImageSampler:
    """Shared body of the image-output samplers."""

    CATEGORY = "VersatileDiffusion/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Image latents: decode them with VAE Decode and the VD Loader's vae.",)
    FUNCTION = "sample"

    @staticmethod
    def size_inputs() -> dict:
        def side(name):
            return ("INT", {"default": 512, "min": 8, "max": MAX_SIZE, "step": 8, "tooltip": (
                f"Output {name} in pixels, a multiple of 8 (VD was trained at 512). Ignored when a latent is connected.")})

        return {
            "width": side("width"),
            "height": side("height"),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": (
                "Number of images. Ignored when a latent is connected (its batch is used).")}),
        }

    @staticmethod
    def conditioning_inputs() -> dict:
        """Optional core CONDITIONING in place of the context, for Apply ControlNet and area nodes."""
        tip = ("Optional: '{}' of VD Context to Conditioning after conditioning nodes (Apply ControlNet, "
               "areas); connect both, and they are used instead of the context.")
        return {"positive": ("CONDITIONING", {"tooltip": tip.format("positive")}),
                "negative": ("CONDITIONING", {"tooltip": tip.format("negative")})}

    @staticmethod
    def image_to_image_inputs() -> dict:
        """The optional start latent and denoise amount of the image-to-image samplers."""
        return {
            "latent": ("LATENT", {"tooltip": (
                "Optional start latent (VAE Encode of an image) for image-to-image; it also sets the size and batch.")}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "With a latent: how much of the schedule to run (1 = ignore its content, 0 = return it).")}),
        }

    def run(self, model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
            latent=None, denoise=1.0, positive=None, negative=None):
        name = self.DISPLAY_NAME
        with reported_as(name):
            if (positive is None) != (negative is None):
                raise VDInputError(
                    f"{name}: connect both positive and negative (the two outputs of VD Context to Conditioning), or neither"
                )
            if model is None:
                raise MissingPartError(
                    f"{name}: no image MODEL is loaded. In the VD Loader choose a diffuser and set image_model to "
                    "the contexts you use ('text', 'image' or 'text+image'), then connect its model output here."
                )
            from .comfy_sampling import preview_callback, sample_image_latent
            from .image_model import VDImageModel

            if not isinstance(getattr(model, "model", None), VDImageModel):
                raise VDInputError(
                    f"{name}: this MODEL is not Versatile Diffusion's ({type(getattr(model, 'model', model)).__name__}, "
                    "e.g. from Load Checkpoint); connect the VD Loader's model output (LoRA/patch nodes may sit between)"
                )

            if latent is not None:
                samples, batch_index = _latent_batch(latent, name)
                noise_mask = latent.get("noise_mask")
                height, width = samples.shape[2] * 8, samples.shape[3] * 8
            else:
                check_image_size(width, height)
                channels = model.get_model_object("latent_format").latent_channels
                samples = torch.zeros(batch_size, channels, height // 8, width // 8)
                batch_index, noise_mask = list(range(batch_size)), None
            check_image_run_fits(len(batch_index), width, height, device=model.load_device, dtype=model.model_dtype(),
                                 model_channels=model.model.diffusion_model.model_channels)
            options = _options(seed, steps, cfg, sampler, scheduler, eta, preview_callback(model, steps))
            result = sample_image_latent(model, context, samples, options=options, noise=item_noise(seed, batch_index),
                                         denoise=denoise if latent is not None else 1.0, noise_mask=noise_mask,
                                         conditioning=None if positive is None else (positive, negative))
            out = dict(latent) if latent is not None else {}
            out["samples"] = check_result(result, "the sampled image latents").to(STORAGE_DEVICE, torch.float32)
            return (out,)


class VDTextToImage(_ImageSampler):
    DISPLAY_NAME = "VD Text to Image"
    SEARCH_ALIASES = ["txt2img", "text to image", "generate", "sampler", "t2i"]
    DESCRIPTION = (
        "Samples images from a text context (or any mixed context) with VD's image flow. With a latent "
        "and denoise < 1 it redraws an existing image (image-to-image); with positive/negative from VD "
        "Context to Conditioning through Apply ControlNet, ControlNet steers it."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **sampling_inputs(IMAGE_MODEL_INPUT, "The context: VD CLIP Text Context, or a mixer's output."),
                **cls.size_inputs(),
            },
            "optional": {**cls.image_to_image_inputs(), **cls.conditioning_inputs()},
        }

    def sample(self, model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
               latent=None, denoise=1.0, positive=None, negative=None):
        return self.run(model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
                        latent, denoise, positive, negative)


class VDImageVariation(_ImageSampler):
    DISPLAY_NAME = "VD Image Variation"
    SEARCH_ALIASES = ["variation", "image variation", "img2img", "image to image", "remix", "similar image"]
    DESCRIPTION = (
        "Samples variations of an image from its image context (VD CLIP Image Context; its focus picks "
        "semantic vs style). Fidelity > 0 starts from the image's latent and keeps more of its layout."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **sampling_inputs(IMAGE_MODEL_INPUT, "The image context from VD CLIP Image Context."),
                **cls.size_inputs(),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": (
                    "The input image through VAE Encode; needed when fidelity > 0. It also sets the size and batch.")}),
                "fidelity": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.02, "tooltip": (
                    "The WebUI's Fidelity: 0 = free variation, 1 = the input itself; in between the "
                    "input latent is noised and int(steps·(1 − fidelity)) steps are run.")}),
            },
        }

    def sample(self, model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
               latent=None, fidelity=0.0):
        if fidelity > 0 and latent is None:
            raise VDInputError(
                f"{self.DISPLAY_NAME}: fidelity {fidelity} needs the input image's latent; connect VAE Encode "
                "(the image and the VD Loader's vae) to 'latent', or set fidelity to 0"
            )
        return self.run(model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
                        latent, 1.0 - fidelity)


def join_image_slots(slots, text, text_strength: float) -> tuple[GuidedContext, ...]:
    """The multi-context sampler's slots (``VD_CONTEXT`` tuples or ``None`` for empty slots) joined
    the WebUI's way (`vd_core.flows.multi_context.join_image_contexts`)."""
    return join_image_contexts([context for slot in slots if slot is not None for context in slot], text, text_strength)


class VDMultiContextSampler(_ImageSampler):
    DISPLAY_NAME = "VD Multi Context Sampler"
    SEARCH_ALIASES = ["multi context", "multi image", "image mix", "masks", "collage", "variation"]
    DESCRIPTION = (
        "The WebUI's Multi-Context: up to four images (each with its own mask, focus and weight from VD "
        "CLIP Image Context) guide one image together, joined into a single image context, optionally "
        "with a prompt whose share is the text strength."
    )

    @classmethod
    def INPUT_TYPES(cls):
        shared = sampling_inputs(IMAGE_MODEL_INPUT, "")
        del shared["context"]
        slot_tooltip = "An image context (VD CLIP Image Context, with its mask, focus and weight)."
        return {
            "required": {
                "model": shared.pop("model"),
                "image_1": (VD_CONTEXT, {"tooltip": slot_tooltip}),
                **shared,
                **cls.size_inputs(),
                "text_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "The WebUI's Text Domination τ: the prompt's share; the images share 1 − τ. 0 ignores the text.")}),
            },
            "optional": {
                "image_2": (VD_CONTEXT, {"tooltip": slot_tooltip}),
                "image_3": (VD_CONTEXT, {"tooltip": slot_tooltip}),
                "image_4": (VD_CONTEXT, {"tooltip": slot_tooltip}),
                "text": (VD_CONTEXT, {"tooltip": "Optional text context (VD CLIP Text Context)."}),
                **cls.image_to_image_inputs(),
            },
        }

    def sample(self, model, image_1, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
               text_strength, image_2=None, image_3=None, image_4=None, text=None, latent=None, denoise=1.0):
        with reported_as(self.DISPLAY_NAME):
            context = join_image_slots((image_1, image_2, image_3, image_4), text, text_strength)
        return self.run(model, context, seed, steps, cfg, sampler, scheduler, eta, width, height, batch_size,
                        latent, denoise)


class _TextSampler:
    """Shared body of the text-output samplers (the diffuser's text flow, 768-d Optimus latents)."""

    CATEGORY = "VersatileDiffusion/sampling"
    RETURN_TYPES = (VD_TEXT_LATENT,)
    RETURN_NAMES = ("text_latent",)
    OUTPUT_TOOLTIPS = ("Optimus text latents: turn them into sentences with VD Optimus Text Decode.",)
    FUNCTION = "sample"
    CONTEXT_TOOLTIP = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **sampling_inputs(TEXT_MODEL_INPUT, cls.CONTEXT_TOOLTIP),
                "count": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": (
                    "Number of text latents (the WebUI makes 4). Item i uses seed + i.")}),
            }
        }

    def sample(self, model, context, seed, steps, cfg, sampler, scheduler, eta, count):
        name = self.DISPLAY_NAME
        with reported_as(name):
            part = require_text_model(model, name)
            options = _options(seed, steps, cfg, sampler, scheduler, eta, bridge.progress(steps, preview=False))
            model = part.use()
            latents = sample_text(model, context, n=count, options=options, noise=item_noise(seed, range(count)))
            return (latents.to(STORAGE_DEVICE, torch.float32),)


class VDImageToText(_TextSampler):
    DISPLAY_NAME = "VD Image to Text"
    SEARCH_ALIASES = ["caption", "img2txt", "image to text", "describe image", "captioning", "i2t"]
    DESCRIPTION = (
        "Samples text latents describing an image (VD's text flow on an image context); decode them "
        "with VD Optimus Text Decode. Guidance contrasts with a black image, as the official flow does."
    )
    CONTEXT_TOOLTIP = "The image context from VD CLIP Image Context (focus 0.5 = the official flow)."


class VDTextVariation(_TextSampler):
    DISPLAY_NAME = "VD Text Variation"
    SEARCH_ALIASES = ["text variation", "paraphrase", "rephrase", "txt2txt", "similar sentences"]
    DESCRIPTION = (
        "Samples text latents of sentences similar to a prompt (VD's text flow on a text context); "
        "decode them with VD Optimus Text Decode."
    )
    CONTEXT_TOOLTIP = "The text context from VD CLIP Text Context."
