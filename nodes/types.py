"""The pack's socket types and the objects that travel through them.

ComfyUI accepts any string as a socket type and passes any Python object along a link. The pack
uses five of its own:

==================  ===========================================================================
``VD_MODEL``        :class:`LoadedPart` holding a ``vd_core`` ``FourFlowDiffuser``
``VD_CLIP``         :class:`LoadedPart` holding a ``vd_core`` ``CLIPContextEncoder``
``VD_OPTIMUS``      :class:`LoadedPart` holding a ``vd_core`` ``OptimusVAE``
``VD_CONTEXT``      ``tuple[GuidedContext, ...]`` (``vd_core.contexts``), tensors on the CPU
``VD_TEXT_LATENT``  ``Tensor (n, L)`` float32 on the CPU: Optimus text latents (L = 768 full size)
==================  ===========================================================================

ComfyUI caches node outputs and hands the same object to every consumer, so consumers must treat
these objects as immutable (build new ones, never edit in place).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..vd_core.contexts import GuidedContext

VD_MODEL = "VD_MODEL"
VD_CLIP = "VD_CLIP"
VD_OPTIMUS = "VD_OPTIMUS"
VD_CONTEXT = "VD_CONTEXT"
VD_TEXT_LATENT = "VD_TEXT_LATENT"

# Seeds span ComfyUI's seed widget range (as KSampler's); per-item seeds wrap around at 2⁶⁴.
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# Where cached node outputs live between nodes: ComfyUI's "intermediate device" is the CPU.
STORAGE_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class LoadedPart:
    """One loaded model part and its handle in ComfyUI's memory management.

    Attributes:
        module: the ``vd_core`` module, resting on the offload device.
        managed: ``comfy_bridge.managed(module)``; its ``use()`` returns the module on the compute
            device (ComfyUI may offload it again after the node has run).
        file: the loader choice the part came from (for messages).
    """

    module: torch.nn.Module
    managed: object
    file: str

    def use(self) -> torch.nn.Module:
        """:attr:`module`, loaded on the compute device by ComfyUI's memory management."""
        return self.managed.use()


def stored_context(context: GuidedContext) -> GuidedContext:
    """``context`` with its tensors moved to :data:`STORAGE_DEVICE` as float32 (cached outputs must
    not pin GPU memory; samplers move them to their own device and dtype)."""

    def store(tokens: torch.Tensor | None) -> torch.Tensor | None:
        return None if tokens is None else tokens.detach().to(STORAGE_DEVICE, torch.float32)

    return replace(
        context,
        cond=store(context.cond),
        uncond=store(context.uncond),
        text_flow_uncond=store(context.text_flow_uncond),
    )
