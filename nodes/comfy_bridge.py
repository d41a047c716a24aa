"""The ComfyUI bridge: model folders, devices and dtypes, progress and interrupts (ComfyUI 0.3.64+;
docs/comfyui.md).

Every ComfyUI import here is lazy and every function has a plain fallback, so the pack imports
and its context/text nodes run where ComfyUI is absent (scripts, tests). The modules that build on
ComfyUI's classes (`image_model.py`, `multi_context_unet.py`, `comfy_sampling.py`) need ComfyUI
and are imported only when a node runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import posixpath
import sys
from typing import Callable

import torch

from ..vd_core.errors import Cancelled, CheckpointError, VDInputError

log = logging.getLogger(__name__)

VD_FOLDER = "versatile_diffusion"
# Where a CLIP-L may sit, in look-up order ("text_encoders" is what ComfyUI calls models/clip).
CLIP_FOLDERS = ("clip_vision", "text_encoders", VD_FOLDER)
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"})
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelFileNotFoundError(CheckpointError, FileNotFoundError):
    """A chosen model file or folder does not exist (also a FileNotFoundError for callers that try
    several folders)."""


def comfy_available() -> bool:
    """Whether ComfyUI's modules can be imported (true inside a running ComfyUI)."""
    if "folder_paths" in sys.modules and "comfy.model_management" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("folder_paths") is not None and importlib.util.find_spec("comfy") is not None
    except (ImportError, ValueError):  # a half-initialised module in sys.modules
        return False


# --------------------------------------------------------------------------- model folders


def register_model_folders() -> None:
    """Register ``models/versatile_diffusion`` with ComfyUI, merged with extra_model_paths.yaml.

    The yaml is applied before packs are imported, so an existing entry is extended, never replaced
    (`add_model_folder_path` would also leave the extension set empty, i.e. list every file).
    """
    if not comfy_available():
        return
    import folder_paths

    default = os.path.join(folder_paths.models_dir, VD_FOLDER)
    if VD_FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[VD_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[VD_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[VD_FOLDER] = ([default], set(MODEL_EXTENSIONS))


def list_model_files(folder: str) -> list[str]:
    """ComfyUI's file list of ``folder`` (relative names, for combo inputs); ``[]`` without ComfyUI."""
    if not comfy_available():
        return []
    import folder_paths

    try:
        return list(folder_paths.get_filename_list(folder))
    except KeyError:  # folder not registered (e.g. before register_model_folders)
        return []


def _folder_dirs(folder: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def list_clip_choices() -> list[str]:
    """CLIP-L candidates: Hugging Face folders and single weight files, relative to their folder.

    Searched: ``models/clip_vision``, ``models/clip`` (``text_encoders``), ``models/versatile_diffusion``
    (there only names containing "clip", as the folder also holds the diffuser and VAEs), through
    ComfyUI's cached file lists. A folder holding ``config.json`` and Hugging Face weights is one
    choice (its files are not). A choice resolves with `resolve_model_path` in the first of
    `CLIP_FOLDERS` that holds it.
    """
    choices: list[str] = []
    for folder in CLIP_FOLDERS:
        files = list_model_files(folder)
        hf_folders = {
            parent for parent, name in (posixpath.split(f) for f in files)
            if parent and name in HF_WEIGHT_FILES and _has_config(folder, parent)
        }
        choices += sorted(hf_folders)
        choices += [f for f in files if posixpath.dirname(f) not in hf_folders
                    and (folder != VD_FOLDER or "clip" in f.lower())]
    return list(dict.fromkeys(choices))


def _has_config(folder: str, relative: str) -> bool:
    return any(os.path.isfile(os.path.join(base, relative, "config.json")) for base in _folder_dirs(folder))


def resolve_model_path(folder: str, name: str) -> pathlib.Path:
    """The full path of the file or Hugging Face folder ``name`` chosen from ComfyUI ``folder``.

    Without ComfyUI, ``name`` itself is the path.

    Raises:
        ModelFileNotFoundError: nothing of that name; the message lists the folders searched.
    """
    if not comfy_available():
        path = pathlib.Path(name).expanduser()
        if not path.exists():
            raise ModelFileNotFoundError(f"model file {name!r} not found (outside ComfyUI, model names are file paths).")
        return path
    # Own look-up rather than get_full_path: a choice may be a Hugging Face folder, not a file.
    relative = os.path.relpath(os.path.join("/", name), "/")  # no escaping the model folders
    for base in _folder_dirs(folder):
        if os.path.exists(os.path.join(base, relative)):
            return pathlib.Path(base, relative)
    raise ModelFileNotFoundError(
        f"{name!r} was not found in ComfyUI's {folder!r} model folder(s) {_folder_dirs(folder) or '(none registered)'}: "
        "put the file there (or add the folder to extra_model_paths.yaml) and press R to refresh the lists."
    )


def comfy_tokenizer_dirs() -> list[pathlib.Path]:
    """ComfyUI's bundled CLIP tokenizer folder (``comfy/sd1_tokenizer``), found without importing it."""
    if not comfy_available():
        return []
    spec = importlib.util.find_spec("comfy")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return [p for p in (pathlib.Path(r) / "sd1_tokenizer" for r in roots) if (p / "vocab.json").is_file()]


# --------------------------------------------------------------------------- devices and dtypes


def compute_device() -> torch.device:
    """Where models run: ComfyUI's torch device (cpu under --cpu); else cuda, mps or cpu."""
    if comfy_available():
        import comfy.model_management as mm

        return torch.device(mm.get_torch_device())
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle weights wait: ComfyUI's unet offload device (cpu unless --highvram); else cpu."""
    if comfy_available():
        import comfy.model_management as mm

        return torch.device(mm.unet_offload_device())
    return torch.device("cpu")


def pick_dtype(choice: str, device) -> torch.dtype:
    """The weight/compute dtype for ``choice`` in ``DTYPE_CHOICES`` on ``device``.

    ``auto``: ComfyUI's diffusion-model choice (honours --fp16-unet/--bf16-unet/--fp32-unet, else
    what the device runs well); fp32 on CPU; outside ComfyUI fp16 on accelerators (the WebUI's
    default, algorithm.md §9).
    """
    if choice in _DTYPES:
        return _DTYPES[choice]
    if choice != "auto":
        raise VDInputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {choice!r}.")
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if comfy_available():
        import comfy.model_management as mm

        dtype = mm.unet_dtype(device=device, supported_dtypes=list(_DTYPES.values()))
        if dtype in _DTYPES.values():
            return dtype
        log.info("ComfyUI chose %s for diffusion models; VD runs fp16 instead", dtype)  # e.g. --fp8 flags
    return torch.float16


def model_patcher_class() -> type:
    """The patcher core uses for diffusion models: ``CoreModelPatcher`` where it exists (newer
    ComfyUI), ``ModelPatcher`` in 0.3.64. Needs ComfyUI."""
    import comfy.model_patcher

    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


# --------------------------------------------------------------------------- progress and interrupts


def progress(total: int, preview: bool = True) -> Callable[[int, int, torch.Tensor, torch.Tensor], None]:
    """A sampler callback ``(step, total, x, x0_estimate)``, ``step`` counting from 0.

    In ComfyUI it advances the node's progress bar and, for image latents (B, 4, h, w) in the
    diffusion space (×0.18215), sends a preview of ``x0_estimate[0]`` decoded with the user's
    ``--preview-method`` (none, latent2rgb, taesd). Text latents get the bar only. Without ComfyUI
    it does nothing.
    """
    if not comfy_available():
        return lambda step, total, x, x0: None
    import comfy.latent_formats
    import comfy.utils
    import latent_preview

    bar = comfy.utils.ProgressBar(total)
    previewer = latent_preview.get_previewer(compute_device(), comfy.latent_formats.SD15()) if preview else None

    def report(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        image = None
        if previewer is not None and x0 is not None and x0.dim() == 4 and x0.shape[1] == 4:
            image = previewer.decode_latent_to_preview_image("JPEG", x0)
        bar.update_absolute(step + 1, total, image)

    return report


def cancel_check() -> Callable[[], bool]:
    """``() -> bool``: whether the user pressed Cancel (ComfyUI's interrupt flag); never without ComfyUI."""
    if not comfy_available():
        return lambda: False
    import comfy.model_management as mm

    return mm.processing_interrupted


def raise_interrupted() -> None:
    """Raise what makes ComfyUI report "interrupted" rather than an error (use after `Cancelled`).

    Clears ComfyUI's interrupt flag, as its own samplers do. Without ComfyUI raises `Cancelled`.
    """
    if not comfy_available():
        raise Cancelled("sampling was cancelled")
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException()
