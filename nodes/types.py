"""The pack's socket types and the objects that travel through them.

ComfyUI accepts any string as a socket type and passes any Python object along a link. The pack
uses five of its own:

==================  ===========================================================================
``MODEL``           core's: VD's image flows on ComfyUI's SD 1.x UNet (``image_model.py``)
``VD_MODEL``        :class:`LoadedPart` holding the text-flow part of the ``FourFlowDiffuser``
``VD_CLIP``         :class:`LazyCLIP`: a CLIP file whose towers load when used
``VD_OPTIMUS``      :class:`LoadedPart` holding a ``vd_core`` ``OptimusVAE``
``VD_CONTEXT``      ``tuple[GuidedContext, ...]`` (``vd_core.contexts``), tensors on the CPU
``VD_TEXT_LATENT``  ``Tensor (n, L)`` float32 on the CPU: Optimus text latents (L = 768 full size)
==================  ===========================================================================

ComfyUI caches node outputs and hands the same object to every consumer, so consumers must treat
these objects as immutable (build new ones, never edit in place).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace

import torch

from ..vd_core.contexts import GuidedContext
from .parts import ManagedModule

log = logging.getLogger(__name__)

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
    """One loaded model part (``VD_MODEL``: the text-flow diffuser; ``VD_OPTIMUS``).

    Attributes:
        module: the ``vd_core`` module, resting on the offload device.
        managed: its `ManagedModule`.
        file: the loader choice the part came from (for messages).
    """

    module: torch.nn.Module
    managed: ManagedModule
    file: str

    @classmethod
    def manage(cls, module: torch.nn.Module, name: str, file: str) -> "LoadedPart":
        return cls(module, ManagedModule(module, name), file)

    def use(self) -> torch.nn.Module:
        """:attr:`module`, its weights loaded on the compute device by ComfyUI's memory management
        (``module`` may wrap the managed module, as VD Speed Up's does: one owner of the weights)."""
        self.managed.use()
        return self.module


@dataclass
class LazyCLIP:
    """``VD_CLIP``: a CLIP ViT-L/14 file whose towers load on first use, each its own part (a text
    →image graph never loads the 0.3 B-parameter vision tower, a variation graph not the text one).

    ``load(tower)`` is ``vd_core.clip.load_clip`` bound to the file, tokenizer and dtype.
    """

    path: os.PathLike
    file: str
    load: object
    _towers: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def use(self, tower: str) -> torch.nn.Module:
        """The ``CLIPContextEncoder`` holding ``tower`` ("text" or "vision") on the compute device."""
        with self._lock:
            if tower not in self._towers:
                encoder = self.load(tower)
                self._towers[tower] = ManagedModule(encoder, f"VD_CLIP_{tower}_tower")
                log.info("VD CLIP: loaded the %s tower of %s", tower, self.file)
        return self._towers[tower].use()


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
