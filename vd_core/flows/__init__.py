"""The VD flows (algorithm.md §8, §10): one function per flow, plus the low-level sampling the nodes use.

Every function takes a ``VDModels`` bundle (``vd_core.models.load_models``) and plain tensors:
images ``(B, 3, H, W)`` in [0, 1], masks ``(B, 1, H, W)`` with 1 = keep, unscaled image latents.
"""

from .context_builders import image_context, mix_contexts, text_context
from .dual_context import dual_context
from .edit_image_with_text import edit_image_with_text
from .image_to_text import image_to_text
from .image_variation import image_variation
from .multi_context import ImageSlot, multi_context
from .options import SamplingOptions
from .result import ImageFlowResult
from .sampling import sample_image, sample_text
from .text_to_image import text_to_image
from .text_variation import text_variation

__all__ = [
    "ImageFlowResult",
    "ImageSlot",
    "SamplingOptions",
    "dual_context",
    "edit_image_with_text",
    "image_context",
    "image_to_text",
    "image_variation",
    "mix_contexts",
    "multi_context",
    "sample_image",
    "sample_text",
    "text_context",
    "text_to_image",
    "text_variation",
]
