"""The pack's own model parts (text-flow diffuser, CLIP towers, Optimus) under ComfyUI's memory
management, one ModelPatcher each (the image flows' MODEL is `image_model.py`; the objects that
travel between nodes are in `types.py`).

Inside ComfyUI every part is wrapped in a ModelPatcher, so loading it may unload other models, it
goes back to the offload device when ComfyUI needs the memory, and "Free model memory" releases it.
Before that, its torch layers are given ComfyUI's casting classes (``comfy.ops``), so ``--lowvram`` /
``--novram`` can stream their weights; a part that also holds bare parameters is loaded whole.
Without ComfyUI, ``use()`` moves the module to the compute device.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import comfy_bridge as bridge

log = logging.getLogger(__name__)

# torch layer → the name of ComfyUI's casting class of the same layer (comfy.ops.disable_weight_init).
_CASTING_LAYERS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding")


@functools.cache
def _casting_class(layer_class: type) -> type | None:
    """ComfyUI's casting class for ``layer_class``: its own for a torch layer, and for a subclass of
    one (vd_core's ``LinearMultiDim``) a class putting the subclass first, so that its forward's
    ``super().forward`` reaches the casting layer. None for other classes."""
    import comfy.ops

    for name in _CASTING_LAYERS:
        base = getattr(torch.nn, name)
        if issubclass(layer_class, base):
            casting = getattr(comfy.ops.disable_weight_init, name)
            return casting if layer_class is base else type(layer_class.__name__, (layer_class, casting), {})
    return None


def use_comfy_casting(module: torch.nn.Module) -> bool:
    """Give ``module``'s torch layers ComfyUI's casting classes (same parameters, same maths until
    ComfyUI streams them). Returns whether every parameter now sits in such a layer."""
    castable = True
    for layer in module.modules():
        casting = None if hasattr(layer, "comfy_cast_weights") else _casting_class(type(layer))
        if casting is not None:
            layer.__class__ = casting  # a subclass adding only class attributes
            if isinstance(layer, torch.nn.Embedding):
                layer.bias = None  # comfy.ops' embedding casts a (None) bias too
        elif any(True for _ in layer.parameters(recurse=False)) and not hasattr(layer, "comfy_cast_weights"):
            castable = False
    return castable


class _Holder(torch.nn.Module):
    """A container, so that ModelPatcher's bookkeeping attributes land on it, not on our module."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


@functools.cache
def _holder_class(name: str) -> type:
    """A holder class named after the part: ComfyUI logs "Requested to load <class name>"."""
    return type(name, (_Holder,), {})


class ManagedModule:
    """A module under ComfyUI's memory management; ``use()`` returns it ready on the compute device."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module = module
        self.patcher = None
        self.full_load = True
        if bridge.comfy_available():
            self.full_load = not use_comfy_casting(module)
            holder = _holder_class(name)(module)
            self.patcher = bridge.model_patcher_class()(holder, load_device=bridge.compute_device(),
                                                        offload_device=bridge.offload_device())

    def use(self) -> torch.nn.Module:
        """The module on the compute device."""
        if self.patcher is None:
            return self.module.to(bridge.compute_device())
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], force_full_load=self.full_load)
        return self.module
