"""The four-flow diffuser: one walk over data layers chosen by the data's kind and context layers
chosen by each context's kind (algorithm.md §1, §4).

``FourFlowDiffuser.image`` holds the shared time MLP, the image data layers and the image-context
layers; ``.text`` the text data layers and the text-context layers. ``state_dict()`` keys are the
release's ``diffuser.*`` keys without ``diffuser.``. Text→image, for instance, runs
``image.time_embed`` + ``image.data_blocks`` + ``text.context_blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from ..errors import MissingPartError, VDInputError
from .blocks import build_context_blocks, build_image_data_blocks, build_text_data_blocks, build_time_embed
from .config import DiffuserConfig
from .layout import CONCAT, CONTEXT, DATA, PUSH, execution_order
from .timestep import timestep_embedding

Kind = Literal["image", "text"]
KINDS: tuple[Kind, ...] = ("image", "text")


class ContextInput(NamedTuple):
    """One context for a forward pass.

    Attributes:
        kind: ``"text"`` (CLIP text tokens, N = 77) or ``"image"`` (CLIP image tokens, N = 257·k);
            selects the context layers (algorithm.md §1).
        tokens: (B, N, D) float, the batch of the data.
        ratio: mixing weight; several contexts' ratios are normalised to sum 1 (algorithm.md §4.3).
    """

    kind: Kind
    tokens: torch.Tensor
    ratio: float = 1.0


@dataclass(frozen=True)
class DiffuserParts:
    """Which layers to build/load. Any data part also brings the shared time MLP
    (``image.time_embed``), which both data kinds use (algorithm.md §2.1)."""

    image_data: bool = False
    text_data: bool = False
    image_context: bool = False
    text_context: bool = False

    @classmethod
    def all(cls) -> "DiffuserParts":
        return cls(True, True, True, True)

    @classmethod
    def for_flow(cls, data_kind: Kind, context_kinds: Sequence[Kind]) -> "DiffuserParts":
        """The parts one flow needs, e.g. ``for_flow("image", ["text"])`` for text→image."""
        kinds = {data_kind, *context_kinds}
        if not kinds <= set(KINDS):
            raise VDInputError(f"kinds must be 'image' or 'text', got {sorted(kinds - set(KINDS))}")
        return cls(
            image_data=data_kind == "image",
            text_data=data_kind == "text",
            image_context="image" in context_kinds,
            text_context="text" in context_kinds,
        )

    def __or__(self, other: "DiffuserParts") -> "DiffuserParts":
        return DiffuserParts(*(getattr(self, f.name) or getattr(other, f.name) for f in fields(self)))

    def __str__(self) -> str:
        names = [f.name.replace("_", " ") for f in fields(self) if getattr(self, f.name)]
        return " + ".join(names) or "no parts"

    @property
    def time_embed(self) -> bool:
        return self.image_data or self.text_data

    def has_data(self, kind: Kind) -> bool:
        return self.image_data if kind == "image" else self.text_data

    def has_context(self, kind: Kind) -> bool:
        return self.image_context if kind == "image" else self.text_context


class DiffuserHalf(nn.Module):
    """``diffuser.image`` or ``diffuser.text``: the lists that were built (absent ones are None)."""

    def __init__(
        self, time_embed: nn.Module | None, data_blocks: nn.ModuleList | None, context_blocks: nn.ModuleList | None
    ):
        super().__init__()
        self.time_embed = time_embed
        self.data_blocks = data_blocks
        self.context_blocks = context_blocks


class FourFlowDiffuser(nn.Module):
    """The VD diffuser: ε-prediction for image latents and text latents under image and/or text contexts."""

    def __init__(self, config: DiffuserConfig, parts: DiffuserParts | None = None):
        super().__init__()
        parts = DiffuserParts.all() if parts is None else parts
        self.config = config
        self.parts = parts
        self.image = DiffuserHalf(
            build_time_embed(config) if parts.time_embed else None,
            build_image_data_blocks(config) if parts.image_data else None,
            build_context_blocks(config, "image") if parts.image_context else None,
        )
        self.text = DiffuserHalf(
            None,
            build_text_data_blocks(config) if parts.text_data else None,
            build_context_blocks(config, "text") if parts.text_context else None,
        )
        self._order = execution_order(config.layout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, contexts: Sequence[ContextInput]) -> torch.Tensor:
        """ε for the noisy data ``x`` at timesteps ``t``.

        Args:
            x: image latents (B, C, h, w) in diffusion space (unscaled × 0.18215), or text latents (B, L).
            t: (B,) model timesteps in [0, 999] (integer or fractional; a 0-d tensor is broadcast).
            contexts: one or more :class:`ContextInput`. With several, every context layer runs once
                per context on the same input and the outputs are mixed by the normalised ratios
                (algorithm.md §4.3 'attention'), for both data kinds. Tokens are cast to ``x``'s dtype.

        Returns:
            ε, the shape and dtype of ``x``.

        Raises:
            MissingPartError: a needed layer list was not built/loaded.
            VDInputError: bad shapes, kinds or ratios.
        """
        data_kind = _data_kind(x)
        data_blocks = self._data_blocks(data_kind)
        self._check_data(x, data_kind)
        mixing = [
            (self._context_blocks(c.kind), self._tokens(c, x), ratio)
            for c, ratio in zip(contexts, normalised_ratios(contexts))
        ]
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        # The time MLP is always the image diffuser's, at its width (algorithm.md §2.1, §4.3 bug 2 avoided).
        emb = self.image.time_embed(timestep_embedding(t.to(x.device), self.config.model_channels).to(x.dtype))
        h, skips, n_data, n_context = x, [], 0, 0
        for op in self._order:
            if op == DATA:
                # An upsampling layer is always followed by the concatenation of the top skip: it
                # upsamples to that skip's size (odd latent sides, see image_layers.Upsample).
                size = skips[-1].shape[2:] if skips and h.dim() == 4 else None
                h = data_blocks[n_data](h, emb, size)
                n_data += 1
            elif op == CONTEXT:
                h = _mix(h, mixing, n_context)
                n_context += 1
            elif op == PUSH:
                skips.append(h)
            elif op == CONCAT:
                h = torch.cat([h, skips.pop()], dim=1)
        return h

    def _data_blocks(self, kind: Kind) -> nn.ModuleList:
        blocks = getattr(self, kind).data_blocks
        if blocks is None:
            raise MissingPartError(
                f"the diffuser was loaded without its {kind} data layers (diffuser.{kind}.data_blocks), needed "
                f"for {kind} data; load it with parts including {kind}_data=True, e.g. "
                f"DiffuserParts.for_flow({kind!r}, [...])"
            )
        return blocks

    def _check_data(self, x: torch.Tensor, kind: Kind) -> None:
        config = self.config
        if kind == "text":
            if x.shape[1] != config.text_latent_dim:
                raise VDInputError(
                    f"text latents have width {x.shape[1]}; this diffuser takes {config.text_latent_dim}"
                )
            return
        # Any h, w ≥ 1: the way down rounds odd sides up (⌈h/2⌉) and the way up upsamples to
        # the skip's size, so every multiple of 8 px works with the kl-f8 VAE.
        if x.shape[1] != config.in_channels or x.shape[2] < 1 or x.shape[3] < 1:
            raise VDInputError(
                f"image latents have shape {tuple(x.shape)}; this diffuser takes (B, {config.in_channels}, h, w) "
                f"latents (images of any multiple of 8 pixels through the kl-f8 VAE)"
            )

    def _context_blocks(self, kind: str) -> nn.ModuleList:
        if kind not in KINDS:
            raise VDInputError(f"context kind must be 'image' or 'text', not {kind!r}")
        blocks = getattr(self, kind).context_blocks
        if blocks is None:
            raise MissingPartError(
                f"the diffuser was loaded without its {kind}-context layers (diffuser.{kind}.context_blocks), "
                f"needed for {kind} contexts; load it with parts including {kind}_context=True"
            )
        return blocks

    def _tokens(self, context: ContextInput, x: torch.Tensor) -> torch.Tensor:
        tokens = context.tokens
        if tokens.dim() != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.config.context_dim:
            raise VDInputError(
                f"{context.kind} context tokens have shape {tuple(tokens.shape)}; expected (B={x.shape[0]}, N, "
                f"D={self.config.context_dim}) with the batch of the data"
            )
        return tokens.to(x.dtype)


def _data_kind(x: torch.Tensor) -> Kind:
    if x.dim() == 4:
        return "image"
    if x.dim() == 2:
        return "text"
    raise VDInputError(f"data must be image latents (B, C, h, w) or text latents (B, L); got shape {tuple(x.shape)}")


# TorchDynamo cannot trace this numpy arithmetic (torch.compile fails on it), so it runs eagerly
# and the compiled walk receives the ratios as inputs (symbolic after one recompilation).
@torch.compiler.disable
def normalised_ratios(contexts: Sequence[ContextInput]) -> list[float]:
    """Ratios divided by their sum, in float64 as the official numpy code (algorithm.md §4.3)."""
    if not contexts:
        raise VDInputError("the diffuser needs at least one context")
    ratios = np.asarray([float(c.ratio) for c in contexts], dtype=np.float64)
    total = ratios.sum()
    if not np.isfinite(total) or total == 0:
        raise VDInputError(f"context ratios {ratios.tolist()} must have a finite, non-zero sum")
    return (ratios / total).tolist()


def _mix(h: torch.Tensor, mixing: list, index: int) -> torch.Tensor:
    """Context layer ``index`` of every context on ``h``, mixed ``Σ r_i·block_i(h, c_i)``; each
    output includes the residual, so this is ``h + Σ r_i·Δ_i`` (algorithm.md §4.3)."""
    if len(mixing) == 1:
        blocks, tokens, _ = mixing[0]
        return blocks[index](h, tokens)  # the ratio normalises to exactly 1
    out = None
    for blocks, tokens, ratio in mixing:
        y = blocks[index](h, tokens) * ratio
        out = y if out is None else out + y
    return out
