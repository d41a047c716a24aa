"""Loading diffuser weights from any released layout (algorithm.md §4.2; vd_reference README).

Accepted files (safetensors or ``torch.save`` of plain tensors, read by
:func:`vd_core.checkpoint.read_state_dict`):

* the release ``vd-four-flow-v1-0[-fp16].pth`` and the same keys as ``.safetensors``
  (``diffuser.image.*``, ``diffuser.text.*``);
* an all-in-one VD state dict (``diffuser.*`` next to ``vae.*``, ``ctx.*`` and schedule keys; only
  ``diffuser.*`` is read);
* ``FourFlowDiffuser.state_dict()`` saved as is (``image.*``, ``text.*``);
* the pre-2023 layout (``model.diffusion_model.unet_image.* / unet_text.* / time_embed.*``),
  renamed by :func:`layout.legacy_key_map`.

Loading is strict for the requested parts; layers of parts not requested are dropped before any
copy or cast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch

from ..checkpoint import describe_keys, read_state_dict, strip_prefix
from ..errors import CheckpointError
from .config import RELEASE_NUM_HEADS, DiffuserConfig
from .four_flow import KINDS, DiffuserParts, FourFlowDiffuser
from .layout import LEGACY_ROOT, legacy_key_map, legacy_layout, rename_by_prefix

log = logging.getLogger(__name__)

WHAT = "VD diffuser file"


def read_diffuser_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The diffuser tensors of ``path`` with ``FourFlowDiffuser`` keys (``image.data_blocks.0.0.weight``),
    whatever the file's layout; tensors keep the file's dtype and are still memory-mapped to the
    file: copy the ones kept (``load_diffuser`` does).

    Raises:
        CheckpointError: unreadable, or not a VD diffuser (the message says what the file looks like).
    """
    path = Path(path)
    state = read_state_dict(path, what=WHAT, mmap=True)  # mapped: the loader copies what it keeps
    if any(k.startswith("diffuser.") for k in state):
        return strip_prefix(state, "diffuser.")
    if any(k.startswith(f"{LEGACY_ROOT}unet_{kind}.") for k in state for kind in KINDS):
        return _rename_legacy(state, path)
    if any(k.startswith(_part_prefixes(DiffuserParts.all())) for k in state):
        return dict(state)
    raise CheckpointError(f"{WHAT} {path} {_what_else(state)}")


def load_diffuser(
    path: str | os.PathLike,
    parts: DiffuserParts | None = None,
    num_heads: int = RELEASE_NUM_HEADS,
    text_num_heads: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> FourFlowDiffuser:
    """Build a :class:`FourFlowDiffuser` holding ``parts`` and load them from ``path``.

    Sizes come from the tensor shapes; the model is built on the ``meta`` device and takes the
    file's tensors (cast to ``dtype``/``device``) with ``assign=True``, so a file is never held
    twice in memory.

    Args:
        path: a diffuser file in any layout listed in the module docstring.
        parts: the layers to load; None loads all four parts (and requires both halves).
        num_heads: attention heads of the image-context layers (8 in the release; not stored in any file).
        text_num_heads: those of the text-context layers; None = ``num_heads``.
        dtype: floating dtype of the weights; None means float32 (the official fp32 path, which
            every device supports; pass torch.float16 on a GPU for the WebUI's fp16 path).
        device: where the weights go.

    Returns:
        The model in eval mode with ``requires_grad`` off.

    Raises:
        CheckpointError: unreadable file, not a VD diffuser, a requested part missing, unknown keys
            or wrong shapes (the message names a few keys and what the file looks like).
    """
    path = Path(path)
    parts = DiffuserParts.all() if parts is None else parts
    state = read_diffuser_state_dict(path)
    check_parts_present(state, parts, path)
    config = DiffuserConfig.from_state_dict(state, num_heads=num_heads, source=f"{WHAT} {path}",
                                            text_num_heads=text_num_heads)
    with torch.device("meta"):
        model = FourFlowDiffuser(config, parts)
    wanted = select_parts(state, model, path)
    del state  # drops the layers of parts not requested
    dtype = torch.float32 if dtype is None else dtype
    weights = {}
    while wanted:  # release each file tensor as soon as its cast copy exists
        key, value = wanted.popitem()
        # copy=True: a weight never stays mapped to the user's file (truncating it would SIGBUS)
        weights[key] = value.to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(weights, strict=True, assign=True)
    log.info("loaded %s from %s (%s, %s)", parts, path, dtype, device)
    return model.requires_grad_(False).eval()


def select_parts(state: Mapping[str, torch.Tensor], model: FourFlowDiffuser, path: Path) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that ``model`` (built with only some parts) expects, checked strictly:
    every key present, no unknown key inside a built part, every shape equal.

    Raises:
        CheckpointError: naming a few missing/unexpected/mis-shaped keys.
    """
    expected = model.state_dict()
    built = _part_prefixes(model.parts)
    wanted = {k: v for k, v in state.items() if k.startswith(built)}
    other = set(_part_prefixes(DiffuserParts.all())) - set(built)
    unexpected = [k for k in state if k not in expected and not k.startswith(tuple(other))]
    missing = [k for k in expected if k not in wanted]
    if missing or unexpected:
        raise CheckpointError(
            f"{WHAT} {path} does not match the VD diffuser layout it seems to follow: "
            + (f"missing {len(missing)} keys ({describe_keys(missing)}) " if missing else "")
            + (f"unexpected {len(unexpected)} keys ({describe_keys(unexpected)}) " if unexpected else "")
            + f"for {model.parts}. The file is damaged or was written by another program; download it again."
        )
    wrong = [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in wanted.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{WHAT} {path} has {len(wrong)} tensors whose shapes contradict the rest of the file "
            f"({'; '.join(wrong[:3])}); the file is damaged or not a VD diffuser: download it again."
        )
    return wanted


def parts_in_state(state: Mapping[str, torch.Tensor]) -> DiffuserParts:
    """The parts of which ``state`` (``FourFlowDiffuser`` keys) holds at least one tensor."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    return DiffuserParts(
        image_data=has("image.data_blocks."),
        text_data=has("text.data_blocks."),
        image_context=has("image.context_blocks."),
        text_context=has("text.context_blocks."),
    )


def _part_prefixes(parts: DiffuserParts) -> tuple[str, ...]:
    prefixes = ["image.time_embed."] if parts.time_embed else []
    prefixes += [f"{kind}.data_blocks." for kind in KINDS if parts.has_data(kind)]
    prefixes += [f"{kind}.context_blocks." for kind in KINDS if parts.has_context(kind)]
    return tuple(prefixes)


def check_parts_present(state: Mapping[str, torch.Tensor], parts: DiffuserParts, path, fix: str | None = None) -> None:
    """Say which half or layers a file holds when the request needs others (``state``:
    ``FourFlowDiffuser`` keys; ``fix``: the caller's advice, e.g. a loader setting to change)."""
    halves = {kind for kind in KINDS if any(k.startswith(f"{kind}.") for k in state)}
    needed = {kind for kind in KINDS if parts.has_data(kind) or parts.has_context(kind)}
    if parts.time_embed:
        needed.add("image")  # the shared time MLP lives in the image half (algorithm.md §2.1)
    if len(halves) == 1 and needed - halves:
        (half,) = halves
        raise CheckpointError(
            f"{WHAT} {path} holds only the {half} half (diffuser.{half}.*), but {parts} need(s) the "
            f"{' and '.join(sorted(needed - halves))} half too; use the complete vd-four-flow-v1-0 file."
        )
    have = parts_in_state(state)
    absent = [f.name for f in fields(parts) if getattr(parts, f.name) and not getattr(have, f.name)]
    if absent:
        names = " and ".join(name.replace("_context", "-context").replace("_", " ") for name in absent)
        raise CheckpointError(
            f"{WHAT} {path} holds no {names} layers (it holds {have}), which {parts} need(s): "
            + (fix or "ask only for the parts it holds, or use the complete vd-four-flow-v1-0 file.")
        )


def _rename_legacy(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename a pre-2023 file's ``model.diffusion_model.*`` keys to the current layout; the other
    components (``autokl.``, ``optimus.``, ``clip.``, schedule) are not diffuser weights."""
    diffusion = {k: v for k, v in state.items() if k.startswith(LEGACY_ROOT)}
    layouts = {layout for kind in KINDS if (layout := legacy_layout(diffusion, kind)) is not None}
    if len(layouts) != 1:
        raise CheckpointError(
            f"{WHAT} {path} uses the pre-2023 layout (model.diffusion_model.unet_*) but its "
            f"input_blocks do not form {'one' if layouts else 'a'} VD UNet layout; the file is damaged."
        )
    layout = layouts.pop()
    renamed, unmatched = rename_by_prefix(diffusion, legacy_key_map(layout))
    if unmatched:
        raise CheckpointError(
            f"{WHAT} {path} (pre-2023 layout) has {len(unmatched)} keys with no place in the VD diffuser "
            f"({describe_keys(unmatched)}); the file is damaged or not a VD checkpoint."
        )
    log.info("%s: renamed %d pre-2023 diffuser keys", path, len(renamed))
    state = {new: diffusion[old] for old, new in renamed.items()}
    # The old names place context layers explicitly; the current layout infers their levels from
    # widths (finer levels first). Refuse a file where the two would disagree.
    inferred = DiffuserConfig.from_state_dict(state, source=f"{WHAT} {path}").layout
    if inferred != layout:
        raise CheckpointError(
            f"{WHAT} {path} (pre-2023 layout) has context layers on levels {layout.context_levels}, which the "
            f"current layout cannot express (it would read {inferred.context_levels}); this is not a VD release."
        )
    return state


def _what_else(state: Mapping[str, torch.Tensor]) -> str:
    """A sentence saying what a file without diffuser keys looks like, and what to do."""
    keys = list(state)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def contains(*names: str) -> bool:  # at the start or after any wrapper prefix
        return any(k.startswith(names) or any(f".{n}" in k for n in names) for k in keys)

    if starts(LEGACY_ROOT + "input_blocks."):
        kind = "this is a Stable Diffusion 1.x checkpoint, not a VD diffuser"
    elif starts("vae.", "ctx."):
        kind = "this VD state dict holds the VAEs/CLIP (vae.*, ctx.*) but no diffuser.* weights"
    elif contains("post_quant_conv.") and contains("encoder.conv_in."):
        kind = "this is the kl-f8 image VAE (kl-f8.pth), not the diffuser; it belongs in the image VAE slot"
    elif contains("decoder.transformer.wte.", "encoder.embeddings.word_embeddings."):
        kind = "this is the Optimus text VAE (optimus-vae.pth), not the diffuser; it belongs in the Optimus slot"
    elif contains("text_model.embeddings.", "vision_model.embeddings."):
        kind = "this is a CLIP model (clip-vit-large-patch14), not the diffuser; it belongs in the CLIP slot"
    else:
        kind = f"it holds no VD diffuser weights (keys such as {describe_keys(keys)})"
    return (
        f"is not a VD diffuser: {kind}. Use vd-four-flow-v1-0.pth, vd-four-flow-v1-0-fp16.pth or a "
        ".safetensors file written by python -m vd_core.convert."
    )
