"""The bundle of loaded VD parts, and loading only what the requested flows need.

A user downloads four things (README "Model files") and puts them in one folder:

* the diffuser: ``vd-four-flow-v1-0-fp16.pth`` (released), ``vd-four-flow-v1-0.pth`` (float32) or a
  ``.safetensors`` of either made by ``python -m vd_core.convert``;
* ``kl-f8.pth``: the image VAE (algorithm.md §6.1);
* ``optimus-vae.pth``: the Optimus text VAE (algorithm.md §6.2); its tokenizer files are looked up in
  ``optimus_tokenizers/`` beside it (see :mod:`vd_core.optimus.tokenizers`);
* ``clip-vit-large-patch14/``: the Hugging Face folder of OpenAI CLIP ViT-L/14 (algorithm.md §5).

Each flow needs a different subset (algorithm.md §1: the data layers follow the data, the context layers
follow the context), so :func:`load_models` reads only those files, and only the diffuser layers
those flows use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clip import load_clip
from .diffuser import DiffuserParts, load_diffuser
from .errors import CheckpointError, MissingPartError, VDInputError
from .image_vae import load_image_vae
from .optimus import load_optimus

log = logging.getLogger(__name__)

# Released file names, best first. A float16 file computes in float32 exactly (its values are
# representable), so it serves float32 runs when the float32 file is absent.
DIFFUSER_FP16_NAMES = ("vd-four-flow-v1-0-fp16.safetensors", "vd-four-flow-v1-0-fp16.pth")
DIFFUSER_FP32_NAMES = ("vd-four-flow-v1-0.safetensors", "vd-four-flow-v1-0.pth")
IMAGE_VAE_NAMES = ("kl-f8.safetensors", "kl-f8.pth")
OPTIMUS_NAMES = ("optimus-vae.safetensors", "optimus-vae.pth")
CLIP_FOLDER = "clip-vit-large-patch14"
OPTIMUS_TOKENIZER_FOLDER = "optimus_tokenizers"  # where vd_core.optimus looks first, beside optimus-vae.pth

# What each part is, for error messages: (description, file to provide).
_PART_FILES = {
    "diffuser": ("the VD diffuser", DIFFUSER_FP16_NAMES[1]),
    "clip": ("the CLIP context encoder", CLIP_FOLDER + "/"),
    "image_vae": ("the image VAE", IMAGE_VAE_NAMES[1]),
    "optimus": ("the Optimus text VAE", OPTIMUS_NAMES[1]),
}


@dataclass(frozen=True)
class FlowNeeds:
    """What one flow reads: diffuser data/context kinds (algorithm.md §1) and the other parts."""

    data_kinds: frozenset[str]
    context_kinds: frozenset[str]
    image_vae: bool
    optimus: bool


def _needs(data: str, contexts: str, image_vae: bool, optimus: bool) -> FlowNeeds:
    return FlowNeeds(frozenset(data.split()), frozenset(contexts.split()), image_vae, optimus)


# Flow name (= the function name in vd_core.flows) → what it reads. CLIP is needed by every flow.
FLOW_NEEDS: dict[str, FlowNeeds] = {
    "text_to_image": _needs("image", "text", image_vae=True, optimus=False),
    "image_variation": _needs("image", "image", image_vae=True, optimus=False),
    "image_to_text": _needs("text", "image", image_vae=False, optimus=True),
    "text_variation": _needs("text", "text", image_vae=False, optimus=True),
    "dual_context": _needs("image", "image text", image_vae=True, optimus=False),
    "multi_context": _needs("image", "image text", image_vae=True, optimus=False),
    # algorithm.md §10: image→text sampling, Optimus edit, then dual-context image sampling.
    "edit_image_with_text": _needs("image text", "image text", image_vae=True, optimus=True),
}
ALL_FLOWS = tuple(FLOW_NEEDS)


@dataclass(frozen=True)
class ModelFiles:
    """Where each part's file is in a model folder (``None``: not there)."""

    folder: Path
    diffuser: Path | None
    image_vae: Path | None
    optimus: Path | None
    clip: Path | None

    @classmethod
    def find(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "ModelFiles":
        """Look for the released file names in ``folder``.

        Args:
            folder: the model folder.
            dtype: the compute precision; float32 prefers ``vd-four-flow-v1-0.*`` over the fp16 file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"model folder not found: {folder}. Create it and put the VD files in it "
                f"(python -m vd_core download --models {folder})."
            )
        prefer_fp32 = dtype == torch.float32
        diffuser_names = DIFFUSER_FP32_NAMES + DIFFUSER_FP16_NAMES if prefer_fp32 else DIFFUSER_FP16_NAMES + DIFFUSER_FP32_NAMES
        clip = folder / CLIP_FOLDER
        return cls(
            folder=folder,
            diffuser=_first_file(folder, diffuser_names),
            image_vae=_first_file(folder, IMAGE_VAE_NAMES),
            optimus=_first_file(folder, OPTIMUS_NAMES),
            clip=clip if clip.is_dir() else None,
        )

    def path_for(self, part: str) -> Path | None:
        return getattr(self, part)


def _first_file(folder: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class VDModels:
    """The loaded parts; any may be ``None`` when no requested flow needed it.

    Attributes:
        diffuser: ``FourFlowDiffuser`` holding only the layers the requested flows use.
        clip: ``CLIPContextEncoder`` (text and image contexts).
        image_vae: ``ImageVAE`` (kl-f8).
        optimus: ``OptimusVAE``.
        files: where the parts came from (for error messages), or ``None`` when built by hand.
    """

    diffuser: Any = None
    clip: Any = None
    image_vae: Any = None
    optimus: Any = None
    files: ModelFiles | None = field(default=None, repr=False)

    def require(self, part: str, purpose: str) -> Any:
        """The loaded part ``part`` (``"diffuser"``, ``"clip"``, ``"image_vae"``, ``"optimus"``).

        Raises:
            MissingPartError: the part was not loaded; the message names the file and the fix.
        """
        if part not in _PART_FILES:
            raise ValueError(f"unknown model part {part!r}; expected one of {sorted(_PART_FILES)}")
        value = getattr(self, part)
        if value is not None:
            return value
        what, file_name = _PART_FILES[part]
        if self.files is None:
            raise MissingPartError(f"{purpose} needs {what}, which this VDModels does not hold; load it ({file_name}).")
        if self.files.path_for(part) is None:
            raise MissingPartError(
                f"{purpose} needs {what}, but {file_name} is not in {self.files.folder}. Put it there "
                f"(python -m vd_core download --models {self.files.folder})."
            )
        raise MissingPartError(
            f"{purpose} needs {what} ({self.files.path_for(part)}), which was not loaded: include this "
            "flow in load_models(..., flows=...)."
        )


def load_models(
    folder: str | os.PathLike,
    flows: Iterable[str] = ALL_FLOWS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> VDModels:
    """Load from ``folder`` exactly the parts that ``flows`` need.

    Args:
        folder: the model folder (released file names, see the module docstring).
        flows: names from :data:`ALL_FLOWS` (the functions of :mod:`vd_core.flows`).
        device: where the parts go.
        dtype: compute precision of the diffuser and CLIP (``None``: float32; float16 is the
            WebUI's). The two VAEs always compute in float32: they are small, the image decoder can
            overflow in float16, and Optimus' top-p filter is defined by float32 sums (algorithm.md §6.2).

    Raises:
        VDInputError: an unknown flow name.
        CheckpointError: a needed file is missing from ``folder`` (the message lists what is
            there and how to download the rest), or a file is not what its name says.
    """
    flows = tuple(flows)
    unknown = [f for f in flows if f not in FLOW_NEEDS]
    if unknown or not flows:
        raise VDInputError(f"unknown flow(s) {unknown or '(none given)'}; choose from {', '.join(ALL_FLOWS)}")
    dtype = dtype or torch.float32
    files = ModelFiles.find(folder, dtype)
    needs = [FLOW_NEEDS[f] for f in flows]
    data_kinds = frozenset().union(*(n.data_kinds for n in needs))
    context_kinds = frozenset().union(*(n.context_kinds for n in needs))
    wanted = {"diffuser", "clip"}
    wanted |= {"image_vae"} if any(n.image_vae for n in needs) else set()
    wanted |= {"optimus"} if any(n.optimus for n in needs) else set()
    _check_present(files, wanted, flows)

    models = VDModels(files=files)
    parts = diffuser_parts_for(data_kinds, context_kinds)
    log.info("loading the diffuser from %s (%s)", files.diffuser, parts)
    models.diffuser = load_diffuser(files.diffuser, parts=parts, dtype=dtype, device=device)
    models.clip = load_clip(files.clip, dtype=dtype, device=device, towers=clip_towers_for(context_kinds))
    if "image_vae" in wanted:
        models.image_vae = load_image_vae(files.image_vae, device=device)
    if "optimus" in wanted:
        models.optimus = load_optimus(files.optimus, device=device)
    return models


def _check_present(files: ModelFiles, wanted: set[str], flows: tuple[str, ...]) -> None:
    missing = [part for part in sorted(wanted) if files.path_for(part) is None]
    if not missing:
        return
    names = ", ".join(_PART_FILES[p][1] for p in missing)
    present = sorted(p.name for p in files.folder.iterdir())
    raise CheckpointError(
        f"{', '.join(flows)} need(s) {names}, not found in {files.folder} (it holds: "
        f"{', '.join(present) or 'nothing'}). Download the files with "
        f"python -m vd_core download --models {files.folder}"
    )


def diffuser_parts_for(data_kinds: Iterable[str], context_kinds: Iterable[str]) -> DiffuserParts:
    """The diffuser layers that flows with these data and context kinds use (algorithm.md §1)."""
    data_kinds, context_kinds = set(data_kinds), set(context_kinds)
    return DiffuserParts(
        image_data="image" in data_kinds,
        text_data="text" in data_kinds,
        image_context="image" in context_kinds,
        text_context="text" in context_kinds,
    )


def clip_towers_for(context_kinds: Iterable[str]) -> list[str]:
    """CLIP towers for these context kinds: text contexts need the text tower; image contexts (and
    the text flow's black-image contrast, an image context too) the vision tower."""
    context_kinds = set(context_kinds)
    return (["text"] if "text" in context_kinds else []) + (["vision"] if "image" in context_kinds else [])
