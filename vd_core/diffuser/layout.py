"""The block order of both diffusers and the pre-2023 key layout, built from the structure alone.

Both diffusers store two flat lists, ``data_blocks`` and ``context_blocks``, and walk them in one
fixed order (algorithm.md §4.1): ``d`` runs the next data block, ``c`` the next context block, ``S`` pushes
the activation on the skip stack, ``L`` pops it and concatenates it after the activation along
channels. The order depends only on the res blocks per level and on which levels carry context
layers (:class:`BlockLayout`).

The pre-2023 checkpoints named the same blocks Stable-Diffusion style
(``input_blocks.i.j`` / ``middle_block.j`` / ``output_blocks.i.j`` / ``out.j``, algorithm.md §4.2);
:func:`legacy_key_map` rebuilds that naming from the same structure.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

# The walk's operations, in docs/algorithm.md's notation (§4.1).
DATA, CONTEXT, PUSH, CONCAT = "d", "c", "S", "L"

# Roles of data blocks: the first and last layer, a res block (ResBlock / FCBlock), and the
# resolution changes (image: strided / upsampling convolution; text: a same-shape Linear).
INPUT, RES, DOWN, UP, OUTPUT = "input", "res", "down", "up", "output"

LEGACY_ROOT = "model.diffusion_model."


@dataclass(frozen=True)
class BlockLayout:
    """The structure shared by both diffusers (the official constructor asserts they are equal).

    Attributes:
        num_res_blocks: res blocks per level on the way down (the way up has one more per level).
        context_levels: per level, whether each of its res blocks is followed by a context layer.
            The middle block always has one (algorithm.md §4.1 ``m_order = d c d``).
    """

    num_res_blocks: tuple[int, ...]
    context_levels: tuple[bool, ...]


@dataclass(frozen=True)
class Step:
    """One step of the walk. ``role`` (data steps only) is one of INPUT, RES, DOWN, UP, OUTPUT.
    For data and context steps ``level`` is the resolution level
    (0 = finest; the middle block is the deepest level), ``in_width`` the channel count entering
    the block (after a skip concatenation) and ``out_width`` the count leaving it."""

    op: str
    role: str = ""
    level: int = -1
    in_width: int = 0
    out_width: int = 0


def walk(layout: BlockLayout, model_channels: int, channel_mult: Sequence[int]) -> Iterator[Step]:
    """The execution order of one diffuser (algorithm.md §4.1 ``i_order + m_order + o_order``), with the
    channel count of every block; widths are in channels (the text diffuser multiplies them by
    its second_dim internally)."""
    last = len(channel_mult) - 1
    width = model_channels
    skips = [width]
    yield Step(DATA, INPUT, 0, 0, width)
    yield Step(PUSH)
    for level, mult in enumerate(channel_mult):
        for _ in range(layout.num_res_blocks[level]):
            yield Step(DATA, RES, level, width, mult * model_channels)
            width = mult * model_channels
            if layout.context_levels[level]:
                yield Step(CONTEXT, "", level, width, width)
            skips.append(width)
            yield Step(PUSH)
        if level != last:
            yield Step(DATA, DOWN, level, width, width)
            skips.append(width)
            yield Step(PUSH)
    yield Step(DATA, RES, last, width, width)
    yield Step(CONTEXT, "", last, width, width)
    yield Step(DATA, RES, last, width, width)
    for level in range(last, -1, -1):
        for _ in range(layout.num_res_blocks[level] + 1):
            yield Step(CONCAT)
            skip = skips.pop()
            yield Step(DATA, RES, level, width + skip, channel_mult[level] * model_channels)
            width = channel_mult[level] * model_channels
            if layout.context_levels[level]:
                yield Step(CONTEXT, "", level, width, width)
        if level != 0:
            yield Step(DATA, UP, level, width, width)
    yield Step(DATA, OUTPUT, 0, width, 0)


def execution_order(layout: BlockLayout) -> tuple[str, ...]:
    """The operations alone (``d``, ``c``, ``S``, ``L``), in order."""
    return tuple(step.op for step in walk(layout, 1, (1,) * len(layout.num_res_blocks)))


def res_blocks_from_roles(is_res: Sequence[bool]) -> tuple[int, ...] | None:
    """Res blocks per level, from which data blocks (all but the first and last) are res blocks.

    Split at the non-res blocks (down/upsampling), the runs of res blocks are, for L levels:
    ``n_0 … n_{L-2}``, then ``2·n_{L-1} + 3`` (deepest level down, middle, deepest level up),
    then ``n_{L-2}+1 … n_0+1``. Returns None when the sequence has no such shape.
    """
    runs = [0]
    for res in is_res:
        if res:
            runs[-1] += 1
        else:
            runs.append(0)
    if len(runs) % 2 == 0:
        return None
    levels = (len(runs) + 1) // 2
    deepest, odd = divmod(runs[levels - 1] - 3, 2)
    if odd or deepest < 0:
        return None
    counts = (*runs[: levels - 1], deepest)
    if any(runs[levels + k] != counts[levels - 2 - k] + 1 for k in range(levels - 1)):
        return None
    return counts


def infer_context_levels(
    num_res_blocks: Sequence[int], model_channels: int, channel_mult: Sequence[int], context_widths: Sequence[int]
) -> tuple[bool, ...] | None:
    """Which levels carry context layers, from the widths of the context blocks in list order.

    Levels of equal width are indistinguishable by shapes (full size: levels 2 and 3 are both
    1280 wide and only one has context layers), so candidates are tried with context on the
    finer levels first, the convention of every released VD/SD UNet (attention at the finest
    resolutions). Returns None when no assignment reproduces the widths.
    """
    for candidate in itertools.product((True, False), repeat=len(num_res_blocks)):
        layout = BlockLayout(tuple(num_res_blocks), candidate)
        widths = [s.out_width for s in walk(layout, model_channels, channel_mult) if s.op == CONTEXT]
        if widths == list(context_widths):
            return candidate
    return None


def _legacy_block_names(layout: BlockLayout) -> Iterator[tuple[str, str]]:
    """(legacy block prefix, DATA or CONTEXT) of one pre-2023 UNet, in execution order (algorithm.md §4.2)."""
    levels = len(layout.num_res_blocks)
    yield "input_blocks.0.0.", DATA
    index = 1
    for level in range(levels):
        for _ in range(layout.num_res_blocks[level]):
            yield f"input_blocks.{index}.0.", DATA
            if layout.context_levels[level]:
                yield f"input_blocks.{index}.1.", CONTEXT
            index += 1
        if level != levels - 1:
            yield f"input_blocks.{index}.0.", DATA
            index += 1
    yield from (("middle_block.0.", DATA), ("middle_block.1.", CONTEXT), ("middle_block.2.", DATA))
    index = 0
    for level in range(levels - 1, -1, -1):
        for n in range(layout.num_res_blocks[level] + 1):
            yield f"output_blocks.{index}.0.", DATA
            sub = 1
            if layout.context_levels[level]:
                yield f"output_blocks.{index}.1.", CONTEXT
                sub = 2
            if level != 0 and n == layout.num_res_blocks[level]:
                yield f"output_blocks.{index}.{sub}.", DATA  # the level's upsampler shares the last group
            index += 1
    yield "out.", DATA


def legacy_key_map(layout: BlockLayout) -> dict[str, str]:
    """Block prefixes of the pre-2023 layout (``model.diffusion_model.unet_image.input_blocks.1.1.``)
    mapped to those of :class:`FourFlowDiffuser` (``image.context_blocks.0.0.``), both halves and the
    shared time MLP. A key maps by replacing its prefix (:func:`rename_by_prefix`)."""
    mapping = {f"{LEGACY_ROOT}time_embed.": "image.time_embed."}
    for kind in ("image", "text"):
        counters = {DATA: 0, CONTEXT: 0}
        for legacy, op in _legacy_block_names(layout):
            blocks = "data_blocks" if op == DATA else "context_blocks"
            mapping[f"{LEGACY_ROOT}unet_{kind}.{legacy}"] = f"{kind}.{blocks}.{counters[op]}.0."
            counters[op] += 1
    return mapping


def rename_by_prefix(keys: Iterable[str], prefix_map: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """``({old key: new key}, [keys no prefix matched])``; prefixes end with ``.`` and none is a
    prefix of another, so the first match along the key's dots is the only one."""
    renamed, unmatched = {}, []
    for key in keys:
        dot = key.find(".")
        while dot >= 0 and key[: dot + 1] not in prefix_map:
            dot = key.find(".", dot + 1)
        if dot < 0:
            unmatched.append(key)
        else:
            renamed[key] = prefix_map[key[: dot + 1]] + key[dot + 1 :]
    return renamed, unmatched


def legacy_layout(keys: Iterable[str], kind: str) -> BlockLayout | None:
    """The structure of one half of a pre-2023 file, read from its ``input_blocks`` names: a block
    is a res block when it has ``.0.in_layers``, a downsampler otherwise, and carries a context
    layer when it has a ``.1.`` child. None when the half is absent or not laid out that way."""
    prefix = f"{LEGACY_ROOT}unet_{kind}.input_blocks."
    keys = set(keys)
    indices = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})
    if not indices or indices != list(range(len(indices))):
        return None
    counts, flags = [0], [set()]
    for index in indices[1:]:
        if f"{prefix}{index}.0.in_layers.0.weight" in keys:
            counts[-1] += 1
            flags[-1].add(f"{prefix}{index}.1.norm.weight" in keys)
        else:
            counts.append(0)
            flags.append(set())
    if any(len(f) > 1 for f in flags):
        return None
    return BlockLayout(tuple(counts), tuple(True in f for f in flags))


def sd_unet_prefixes(layout: BlockLayout, context_kind: str) -> dict[str, str]:
    """Prefixes of :class:`FourFlowDiffuser` keys → Stable Diffusion 1.x UNet names, for the image
    UNet with the context layers of one kind (``text.context_blocks.0.0.`` → ``input_blocks.1.1.``).

    VD's image data layers plus one kind of context layers are exactly an SD 1.x UNet (algorithm.md §4.2):
    this is the pre-2023 map with its ``model.diffusion_model.unet_<kind>.`` roots removed. The
    image half supplies the data blocks and the time MLP, ``context_kind`` the context blocks.
    """
    names = {f"{LEGACY_ROOT}time_embed.": "time_embed."}
    for kind, op in (("image", DATA), (context_kind, CONTEXT)):
        root = f"{LEGACY_ROOT}unet_{kind}."
        names.update({root + legacy: legacy for legacy, block_op in _legacy_block_names(layout) if block_op == op})
    return {vd: names[legacy] for legacy, vd in legacy_key_map(layout).items() if legacy in names}
