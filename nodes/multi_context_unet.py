"""VD's multi-context mixing on ComfyUI's own SD 1.x UNet (needs ComfyUI; imported lazily).

VD mixes whole context layers, not attention outputs: at every context position each context runs
through the context layer of its kind and the results are blended, ``h ← Σ rᵢ·STᵢ(h, cᵢ)`` with
ratios normalised to sum 1 (algorithm.md §4.3). Attention patches cannot express that, so the UNet's
context layers become :class:`MultiContextSpatialTransformer`: the layer of the *primary* kind
keeps its parameters under ComfyUI's native names (``input_blocks.1.1.norm.weight`` …, so LoRA key
maps, merging and saving see a plain SD 1.x UNet), and holds the other kind's layer as
``secondary`` (``input_blocks.1.1.secondary.norm.weight`` …).

With one context of the primary kind the forward is exactly core's ``UNetModel`` forward.
"""

from __future__ import annotations

import copy

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..vd_core.diffuser.four_flow import ContextInput, normalised_ratios
from ..vd_core.errors import VDInputError

# transformer_options key: the contexts of one forward, [(kind, tokens (B, N, D), normalised ratio)].
CONTEXT_MIX = "vd_context_mix"


class MultiContextSpatialTransformer(SpatialTransformer):
    """A context layer of kind ``primary_kind`` (its own parameters) plus ``secondary``, the same
    position's layer of the other kind, mixing several contexts the VD way."""

    primary_kind: str
    secondary: SpatialTransformer

    @classmethod
    def extend(cls, layer: SpatialTransformer, primary_kind: str) -> None:
        """Turn core's ``layer`` into this class in place; ``secondary`` is a structural copy whose
        weights the loader fills. (In place, so the UNet's module tree and names stay core's.)"""
        secondary = copy.deepcopy(layer)
        layer.__class__ = cls
        layer.primary_kind = primary_kind
        layer.secondary = secondary

    def forward(self, x, context=None, transformer_options={}):
        mix = transformer_options.get(CONTEXT_MIX)
        if mix is None:
            return super().forward(x, context, transformer_options)
        out = None
        for kind, tokens, ratio in mix:
            layer = super().forward if kind == self.primary_kind else self.secondary.forward
            y = layer(x, tokens, transformer_options)
            if len(mix) > 1:  # one context: its ratio normalises to exactly 1
                y = y * ratio
            out = y if out is None else out + y
        return out


class MultiContextUNet(UNetModel):
    """Core's SD 1.x ``UNetModel`` whose context layers hold both kinds (see the module docstring).

    ``forward(x (B, 4, h, w), timesteps (B,), context (B, N₀, D), vd_kinds, vd_ratios,
    vd_extra_contexts, ...)``: ``context`` is the first context's tokens (ComfyUI's
    ``c_crossattn``), ``vd_extra_contexts`` the tokens of the others, ``vd_kinds``/``vd_ratios``
    every context's kind and mixing ratio, first one first. Returns ε (B, 4, h, w).
    """

    def __init__(self, *args, context_kinds: tuple[str, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.context_kinds = tuple(context_kinds)
        for module in list(self.modules()):
            if type(module) is SpatialTransformer:
                MultiContextSpatialTransformer.extend(module, self.context_kinds[0])

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                vd_kinds=None, vd_ratios=None, vd_extra_contexts=None, **kwargs):
        if vd_kinds is not None and (len(vd_kinds) > 1 or vd_kinds[0] != self.context_kinds[0]):
            tokens = [context, *(vd_extra_contexts or ())]
            if not len(tokens) == len(vd_kinds) == len(vd_ratios):
                raise VDInputError(
                    f"a VD CONDITIONING names {len(vd_kinds)} contexts but carries {len(tokens)} token sets: a node "
                    "between 'VD Context to Conditioning' and the sampler dropped VD's extra keys"
                )
            inputs = [ContextInput(k, t, r) for k, t, r in zip(vd_kinds, tokens, vd_ratios)]
            mix = [(c.kind, c.tokens.to(x.dtype), r) for c, r in zip(inputs, normalised_ratios(inputs))]
            transformer_options = {**transformer_options, CONTEXT_MIX: mix}
        return super().forward(x, timesteps, context, y, control, transformer_options, **kwargs)


def unet_class_for(context_kinds: tuple[str, ...]):
    """Core's plain ``UNetModel`` for one context kind, else :class:`MultiContextUNet`."""
    if len(context_kinds) == 1:
        return UNetModel
    return lambda **config: MultiContextUNet(context_kinds=context_kinds, **config)
