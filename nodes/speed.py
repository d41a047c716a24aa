"""An opt-in node that puts the diffuser behind ``vd_core.acceleration``'s fast paths.

The fast paths compute what the plain diffuser computes (``tests/test_acceleration.py``); they only
pay on a CUDA GPU, so on the CPU the node hands the model on unchanged apart from the wrapper.
"""

from __future__ import annotations

import logging

from ..vd_core.acceleration import DEFAULT_COMPILE_CACHE, AcceleratedDiffuser, accelerate_diffuser
from . import comfy_bridge as bridge
from .node_errors import reported_as, require_part
from .types import VD_MODEL, LoadedPart

log = logging.getLogger(__name__)


class VDSpeedUp:
    DISPLAY_NAME = "VD Speed Up"
    CATEGORY = "VersatileDiffusion/loaders"
    DESCRIPTION = (
        "Optional, between the VD Loader and the samplers: runs the diffuser with channels-last "
        "weights and replays each diffuser forward from a recorded CUDA graph (one launch instead of "
        "hundreds; the text flows gain most), optionally compiled with torch.compile. Same images "
        "and texts up to float rounding. GPU only: on the CPU the model passes through unchanged."
    )
    RETURN_TYPES = (VD_MODEL,)
    RETURN_NAMES = ("vd_model",)
    OUTPUT_TOOLTIPS = ("The same diffuser behind the fast paths; connect it where the loader's vd_model went.",)
    FUNCTION = "speed_up"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vd_model": (VD_MODEL, {"tooltip": "The diffuser from the VD Loader."}),
                "cuda_graphs": ("BOOLEAN", {"default": True, "tooltip": (
                    "Record the diffuser forward once per image size and replay it. Each recorded size keeps "
                    "its activation memory (a few hundred MB at 512²) until the model is unloaded.")}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": (
                    "Also fuse the layers with torch.compile. The first run of each size compiles for "
                    "minutes; compiled kernels are kept in ~/.cache/vd_core/inductor for later sessions.")}),
            }
        }

    def speed_up(self, vd_model, cuda_graphs, compile):
        with reported_as(self.DISPLAY_NAME):
            part = require_part(vd_model, self.DISPLAY_NAME, "diffuser", "diffuser", "vd_model")
            diffuser = part.module.diffuser if isinstance(part.module, AcceleratedDiffuser) else part.module
            on_gpu = bridge.compute_device().type == "cuda"
            if not on_gpu:
                log.info("%s: no CUDA GPU; the fast paths do not pay on the CPU, running the plain diffuser",
                         self.DISPLAY_NAME)
            # channels-last converts the shared weights in place: same values, another memory order.
            fast = accelerate_diffuser(
                diffuser,
                channels_last=on_gpu,
                cuda_graphs=cuda_graphs and on_gpu,
                compile=compile and on_gpu,
                cache_dir=DEFAULT_COMPILE_CACHE if compile and on_gpu else None,
            )
            return (LoadedPart.manage(fast, "VD_text_flow_diffuser", part.file),)
