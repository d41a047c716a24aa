"""The block lists of one diffuser half, built in walk order from the config (algorithm.md §4.1–4.2).

Every element of the official lists is a one-child wrapper, which is why every key has a ``.0.``
after the index (``image.data_blocks.4.0.in_layers.0.weight``); :class:`DataSlot` and
:class:`ContextSlot` are those wrappers with the call signature the walk uses.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DiffuserConfig
from .context_layer import SpatialTransformer
from .image_layers import Downsample, ResBlock, Upsample, image_input_layer, image_output_layer
from .layout import CONTEXT, DATA, DOWN, INPUT, OUTPUT, RES, UP, walk
from .text_layers import FCBlockMultiDim, text_input_layer, text_output_layer, text_resample_layer


class DataSlot(nn.Module):
    """``data_blocks.N``: holds one data layer as child ``0``; ``forward(h, emb, size)`` passes the
    time embedding only to res blocks, and ``size`` (the next skip's spatial size) only to image
    upsampling layers."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.add_module("0", layer)
        self.takes_emb = isinstance(layer, ResBlock)
        self.takes_size = isinstance(layer, Upsample)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        layer = self._modules["0"]
        if self.takes_emb:
            return layer(h, emb)
        return layer(h, size) if self.takes_size else layer(h)


class ContextSlot(nn.Module):
    """``context_blocks.N``: holds one :class:`SpatialTransformer` as child ``0``."""

    def __init__(self, layer: SpatialTransformer):
        super().__init__()
        self.add_module("0", layer)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._modules["0"](h, tokens)


def build_time_embed(config: DiffuserConfig) -> nn.Sequential:
    """Linear(model_channels → 4·mc) → SiLU → Linear(4·mc → 4·mc): the shared global layer (§2.1)."""
    width = config.time_embed_dim
    return nn.Sequential(nn.Linear(config.model_channels, width), nn.SiLU(), nn.Linear(width, width))


def build_image_data_blocks(config: DiffuserConfig) -> nn.ModuleList:
    """``diffuser.image.data_blocks``: conv in, ResBlocks, Down/Upsample, output layer (§4.2)."""
    if config.in_channels is None or config.out_channels is None:
        raise ValueError("the config has no image latent channels (in_channels/out_channels)")
    emb = config.time_embed_dim
    layers = []
    for step in walk(config.layout, config.model_channels, config.channel_mult):
        if step.op != DATA:
            continue
        if step.role == INPUT:
            layers.append(image_input_layer(config.in_channels, config.model_channels))
        elif step.role == RES:
            layers.append(ResBlock(step.in_width, step.out_width, emb))
        elif step.role == DOWN:
            layers.append(Downsample(step.in_width))
        elif step.role == UP:
            layers.append(Upsample(step.in_width))
        elif step.role == OUTPUT:
            layers.append(image_output_layer(config.model_channels, config.out_channels))
    return nn.ModuleList(DataSlot(layer) for layer in layers)


def build_text_data_blocks(config: DiffuserConfig) -> nn.ModuleList:
    """``diffuser.text.data_blocks``: Linear in, FCBlocks, same-shape Linears, output layer (§3.4)."""
    if config.text_latent_dim is None or config.second_dim is None:
        raise ValueError("the config has no text latent width (text_latent_dim/second_dim)")
    emb, sdim = config.time_embed_dim, config.second_dim
    layers = []
    for step in walk(config.layout, config.model_channels, config.channel_mult):
        if step.op != DATA:
            continue
        if step.role == INPUT:
            layers.append(text_input_layer(config.text_latent_dim, config.model_channels, sdim))
        elif step.role == RES:
            layers.append(FCBlockMultiDim(step.in_width, step.out_width, sdim, emb))
        elif step.role in (DOWN, UP):
            layers.append(text_resample_layer(step.in_width, sdim))
        elif step.role == OUTPUT:
            layers.append(text_output_layer(config.model_channels, sdim, config.text_latent_dim))
    return nn.ModuleList(DataSlot(layer) for layer in layers)


def build_context_blocks(config: DiffuserConfig, kind: str) -> nn.ModuleList:
    """``diffuser.<kind>.context_blocks``: one SpatialTransformer per ``c`` of the walk. Both kinds
    have the same widths (their own head counts); the kind names the context they attend to, not
    the data (algorithm.md §1)."""
    return nn.ModuleList(
        ContextSlot(SpatialTransformer(step.out_width, config.context_dim, config.heads_of(kind)))
        for step in walk(config.layout, config.model_channels, config.channel_mult)
        if step.op == CONTEXT
    )
