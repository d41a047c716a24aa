"""Image post-processing nodes of the official WebUI."""

from __future__ import annotations

from ..vd_core.color_match import match_color_simple
from ..vd_core.flows.image_prep import resize_images
from .comfy_images import to_comfy_images, to_vd_images
from .node_errors import reported_as


class VDColorMatch:
    DISPLAY_NAME = "VD Color Match"
    CATEGORY = "VersatileDiffusion/image"
    SEARCH_ALIASES = ["color match", "colour match", "color transfer", "color correction", "variation"]
    DESCRIPTION = (
        "The WebUI's 'Simple' colour adjustment for Image Variation: gives every image the "
        "per-channel mean and spread of the reference image (usually the input image)."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The colour-matched images.",)
    FUNCTION = "match"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The images to adjust, e.g. VAE Decode of VD Image Variation."}),
                "reference": ("IMAGE", {"tooltip": (
                    "The image whose colours to take (one for all, or one per image); resized to the "
                    "images' size first, as the WebUI does.")}),
            }
        }

    def match(self, image, reference):
        with reported_as(self.DISPLAY_NAME):
            images = to_vd_images(image)
            # The WebUI's reference is the input resized (PIL bicubic) to the output size.
            ref = resize_images(to_vd_images(reference), images.shape[3], images.shape[2])
            return (to_comfy_images(match_color_simple(images, ref)),)
