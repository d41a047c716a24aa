"""The diffuser's hyper-parameters, read from tensor shapes (algorithm.md §4; vd_reference README,
"Where a loader gets each hyper-parameter").

Only the attention head count cannot be read from a file: the release uses 8 in both diffusers.
GroupNorm always has 32 groups (algorithm.md §3.1, §3.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, VDInputError
from .layout import DATA, RES, BlockLayout, infer_context_levels, res_blocks_from_roles, walk

RELEASE_NUM_HEADS = 8
NORM_GROUPS = 32
# attn2.to_k maps context tokens (in-features = context width D) in every context block.
_CROSS_ATTENTION_KEY = "context_blocks.0.0.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class DiffuserConfig:
    """Sizes of the four-flow diffuser. Both halves share every width (their context layers are
    interchangeable, algorithm.md §1); fields of a half that a file lacks are None.

    Attributes:
        model_channels: width of the first level (320 full size).
        channel_mult: width of each level in units of ``model_channels`` ((1, 2, 4, 4)).
        num_res_blocks: res blocks per level on the way down ((2, 2, 2, 2)).
        context_levels: levels whose res blocks are followed by context layers ((T, T, T, F)).
        context_dim: width D of the context tokens (768, the CLIP projection).
        in_channels, out_channels: image latent channels (4); None without image data layers.
        text_latent_dim: text latent width L (768, the Optimus latent); None without text data layers.
        second_dim: the text diffuser's second axis (4): its activations are (B, C, second_dim, 1).
        num_heads: attention heads of the image-context layers (``diffuser.image.context_blocks``;
            8 in the release; not in any file).
        text_num_heads: attention heads of the text-context layers; None = ``num_heads`` (the
            official config gives each diffuser half its own count; the release uses 8 for both).
    """

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    context_levels: tuple[bool, ...]
    context_dim: int
    in_channels: int | None = None
    out_channels: int | None = None
    text_latent_dim: int | None = None
    second_dim: int | None = None
    num_heads: int = RELEASE_NUM_HEADS
    text_num_heads: int | None = None

    def heads_of(self, kind: str) -> int:
        """Attention heads of the context layers of ``kind`` ("image" or "text")."""
        return self.text_num_heads if kind == "text" and self.text_num_heads is not None else self.num_heads

    def __post_init__(self):
        if not len(self.channel_mult) == len(self.num_res_blocks) == len(self.context_levels):
            raise VDInputError(
                f"channel_mult {self.channel_mult}, num_res_blocks {self.num_res_blocks} and context_levels "
                f"{self.context_levels} must have one entry per level"
            )
        for width in self.level_widths:
            for heads in {self.heads_of("image"), self.heads_of("text")}:
                if width % heads:
                    raise VDInputError(f"{heads} attention heads do not divide the width {width}; the release uses 8")
            if width % NORM_GROUPS:
                raise VDInputError(f"width {width} is not a multiple of the {NORM_GROUPS} GroupNorm groups")

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding (4 × model_channels, as the official constructor)."""
        return 4 * self.model_channels

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.num_res_blocks, self.context_levels)

    @classmethod
    def full_size(cls, num_heads: int = RELEASE_NUM_HEADS) -> "DiffuserConfig":
        """The released model ``vd-four-flow-v1-0`` (2.57 B diffuser parameters)."""
        return cls(
            model_channels=320,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=(2, 2, 2, 2),
            context_levels=(True, True, True, False),
            context_dim=768,
            in_channels=4,
            out_channels=4,
            text_latent_dim=768,
            second_dim=4,
            num_heads=num_heads,
        )

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], num_heads: int = RELEASE_NUM_HEADS, source: str = "the state dict",
        text_num_heads: int | None = None,
    ) -> "DiffuserConfig":
        """Read every size from ``state`` (keys as in ``FourFlowDiffuser.state_dict()``:
        ``image.data_blocks.0.0.weight`` …). Either half may be absent, not both.

        Raises:
            CheckpointError: the block lists do not form a VD UNet (``source`` names the file).
        """
        data_kinds = [kind for kind in ("image", "text") if f"{kind}.data_blocks.0.0.weight" in state]
        context_kinds = [kind for kind in ("image", "text") if f"{kind}.context_blocks.0.0.proj_in.weight" in state]
        if not data_kinds or not context_kinds:
            raise CheckpointError(
                f"{source} lacks {'data' if not data_kinds else 'context'} layers (image./text."
                f"{'data' if not data_kinds else 'context'}_blocks.*): it is not a complete VD diffuser half"
            )
        structures = {kind: _data_structure(state, kind, source) for kind in data_kinds}
        model_channels, level_widths, num_res_blocks = structures[data_kinds[0]]
        if len(set(structures.values())) > 1:
            raise CheckpointError(f"{source}: the image and text data layers have different layouts {structures}")
        context_widths = {kind: _context_widths(state, kind, source) for kind in context_kinds}
        widths = context_widths[context_kinds[0]]
        if len({tuple(w) for w in context_widths.values()}) > 1:
            raise CheckpointError(f"{source}: the image and text context layers differ in number or width")
        channel_mult = tuple(w // model_channels for w in level_widths)
        context_levels = infer_context_levels(num_res_blocks, model_channels, channel_mult, widths)
        if context_levels is None:
            raise CheckpointError(
                f"{source}: {len(widths)} context layers of widths {widths} do not fit data layers with "
                f"{num_res_blocks} res blocks per level of widths {level_widths}"
            )
        context_kind = context_kinds[0]
        fields = dict(
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            context_levels=context_levels,
            context_dim=_shape(state, f"{context_kind}.{_CROSS_ATTENTION_KEY}", source)[1],
            num_heads=num_heads,
            text_num_heads=text_num_heads,
        )
        if "image" in data_kinds:
            last = _num_blocks(state, "image.data_blocks.") - 1
            fields["in_channels"] = _shape(state, "image.data_blocks.0.0.weight", source)[1]
            fields["out_channels"] = _shape(state, f"image.data_blocks.{last}.0.2.weight", source)[0]
        if "text" in data_kinds:
            text_in = _shape(state, "text.data_blocks.0.0.weight", source)
            fields["text_latent_dim"] = text_in[1]
            fields["second_dim"] = text_in[0] // model_channels
        return cls(**fields)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{source} lacks {key!r}; the file is incomplete or not a VD diffuser")
    return state[key].shape


def _num_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _data_structure(state: Mapping[str, torch.Tensor], kind: str, source: str):
    """``(model_channels, level widths, res blocks per level)`` of one half's data blocks."""
    prefix = f"{kind}.data_blocks."
    count = _num_blocks(state, prefix)
    # The last block starts with GroupNorm(model_channels) in both halves (algorithm.md §4.2 d29).
    final_norm = state.get(f"{prefix}{count - 1}.0.0.weight")
    if final_norm is None or final_norm.dim() != 1:
        raise CheckpointError(f"{source}: {prefix}{count - 1} is not the output layer of a VD diffuser")
    model_channels = final_norm.shape[0]
    # Text activations are (B, C, second_dim, 1) and its res blocks see C·second_dim channels (§3.4).
    second_dim = _shape(state, f"{prefix}0.0.weight", source)[0] // model_channels if kind == "text" else 1
    res_widths = {
        n: state[f"{prefix}{n}.0.in_layers.2.weight"].shape[0] // second_dim
        for n in range(1, count - 1)
        if f"{prefix}{n}.0.in_layers.2.weight" in state
    }
    num_res_blocks = res_blocks_from_roles([n in res_widths for n in range(1, count - 1)])
    if num_res_blocks is None:
        raise CheckpointError(f"{source}: the {count} blocks under {prefix} do not form a VD UNet")
    layout = BlockLayout(num_res_blocks, (False,) * len(num_res_blocks))
    levels = {}
    data_steps = [s for s in walk(layout, 1, (1,) * len(num_res_blocks)) if s.op == DATA]
    for n, step in enumerate(data_steps):
        if step.role == RES:
            levels.setdefault(step.level, set()).add(res_widths[n])
    if any(len(widths) != 1 for widths in levels.values()) or len(levels) != len(num_res_blocks):
        raise CheckpointError(f"{source}: the res blocks under {prefix} have inconsistent widths per level")
    level_widths = tuple(levels[level].pop() for level in range(len(num_res_blocks)))
    if any(w % model_channels for w in level_widths):
        raise CheckpointError(f"{source}: level widths {level_widths} are not multiples of {model_channels}")
    return model_channels, level_widths, num_res_blocks


def _context_widths(state: Mapping[str, torch.Tensor], kind: str, source: str) -> list[int]:
    prefix = f"{kind}.context_blocks."
    return [_shape(state, f"{prefix}{n}.0.proj_in.weight", source)[0] for n in range(_num_blocks(state, prefix))]
