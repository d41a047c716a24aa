"""An opt-in node that puts the text-flow diffuser behind ``vd_core.acceleration``'s fast paths.

The fast paths compute what the plain diffuser computes (``tests/test_acceleration.py``); they only
pay on a CUDA GPU, so on the CPU the node hands on the same diffuser in a plain wrapper. The image
MODEL of the VD Loader is a core ComfyUI model: core's TorchCompileModel serves it.

The node never changes its input (ComfyUI caches the loader's output and hands the same object to
every consumer): no in-place channels-last conversion, a new wrapper and a new ``LoadedPart`` each
run. Compile settings and the kernel cache directory hold for this node's compilations only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..vd_core.acceleration import (
    DEFAULT_COMPILE_CACHE,
    AcceleratedDiffuser,
    accelerate_diffuser,
)
from . import comfy_bridge as bridge
from .node_errors import reported_as
from .samplers import require_text_model
from .types import VD_MODEL, LoadedPart

log = logging.getLogger(__name__)

CACHE_SUBDIR = Path("versatile_diffusion") / "inductor"


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between sessions: ``<ComfyUI user directory>/versatile_diffusion/
    inductor`` inside ComfyUI, the command line's folder (``~/.cache/vd_core/inductor``) outside."""
    if bridge.comfy_available():
        import folder_paths

        return Path(folder_paths.get_user_directory()) / CACHE_SUBDIR
    return DEFAULT_COMPILE_CACHE.expanduser()


class VDSpeedUp:
    DISPLAY_NAME = "VD Speed Up"
    CATEGORY = "VersatileDiffusion/loaders"
    SEARCH_ALIASES = ["speed up", "fast", "accelerate", "torch compile", "cuda graphs", "optimize"]
    DESCRIPTION = (
        "Optional, between the VD Loader's text_model and the text samplers (Image to Text, Text "
        "Variation): replays each diffuser forward from a recorded CUDA graph (one launch instead of "
        "hundreds of small kernels) and/or compiles it with torch.compile. Same texts up to float "
        "rounding. GPU only: on the CPU the diffuser runs unchanged. For the image MODEL use core's "
        "TorchCompileModel."
    )
    RETURN_TYPES = (VD_MODEL,)
    RETURN_NAMES = ("text_model",)
    OUTPUT_TOOLTIPS = ("The same diffuser behind the fast paths; connect it where the loader's text_model went.",)
    FUNCTION = "speed_up"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_model": (VD_MODEL, {"tooltip": "The text-flow diffuser from the VD Loader (its text_model output)."}),
                "cuda_graphs": ("BOOLEAN", {"default": False, "tooltip": (
                    "Experimental, not yet verified on a GPU: record the diffuser forward once per batch size "
                    "and replay it. Each recording keeps its activation memory until the model is unloaded.")}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": (
                    "Fuse the layers with torch.compile (Inductor). The first run of each size compiles for "
                    "minutes; kernels are kept in ComfyUI's user directory (versatile_diffusion/inductor).")}),
            }
        }

    def speed_up(self, text_model, cuda_graphs, compile):
        with reported_as(self.DISPLAY_NAME):
            part = require_text_model(text_model, self.DISPLAY_NAME)
            diffuser = part.module.diffuser if isinstance(part.module, AcceleratedDiffuser) else part.module
            on_gpu = bridge.compute_device().type == "cuda"
            if not on_gpu and (cuda_graphs or compile):
                log.info("%s: no CUDA GPU; the fast paths do not pay on the CPU, running the plain diffuser",
                         self.DISPLAY_NAME)
            fast = accelerate_diffuser(
                diffuser,
                channels_last=False,  # would convert the cached loader output in place
                cuda_graphs=cuda_graphs and on_gpu,
                compile=compile and on_gpu,
                cache_dir=compile_cache_dir() if compile and on_gpu else None,
            )
            # The same weights under the same ModelPatcher: one owner, whatever wraps them.
            return (LoadedPart(fast, part.managed, part.file),)
