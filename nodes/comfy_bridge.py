"""The ComfyUI bridge: the only module of the pack that imports ComfyUI (0.3.64+; docs/comfyui.md).

Every ComfyUI import is lazy, and every function has a plain fallback, so the nodes also run
where ComfyUI is absent (CI, scripts). Covered: model folders, devices and dtypes, memory
management (ModelPatcher), progress with latent previews, interrupts, a core ``VAE`` from a kl-f8
state dict, and the core ``MODEL`` through which KSampler runs VD's image flows.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pathlib
import sys
from typing import Callable

import torch

from ..vd_core.checkpoint import check_same_keys, load_exactly
from ..vd_core.errors import Cancelled, CheckpointError, VDError, VDInputError

log = logging.getLogger(__name__)

VD_FOLDER = "versatile_diffusion"
# Where a CLIP-L may sit, in look-up order ("text_encoders" is what ComfyUI calls models/clip).
CLIP_FOLDERS = ("clip_vision", "text_encoders", VD_FOLDER)
MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin"})
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# CONDITIONING keys of a VD context beyond the primary tokens (see `model_patch.py`); they reach
# `BaseModel.extra_conds` and then the UNet adapter as keyword arguments of the same names.
COND_KINDS = "vd_kinds"  # tuple of "text"/"image", one per context, the primary first
COND_RATIOS = "vd_ratios"  # tuple of float mixing ratios, same order
COND_EXTRA = "vd_extra_contexts"  # list of (B, N_i, D) token tensors of the contexts after the first


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


def _is_hf_folder(path: str) -> bool:
    """A Hugging Face model folder: config.json plus weights."""
    names = set(os.listdir(path))
    return "config.json" in names and bool(names & {"model.safetensors", "pytorch_model.bin"})


def list_clip_choices() -> list[str]:
    """CLIP-L candidates: Hugging Face folders and single weight files, relative to their folder.

    Searched: ``models/clip_vision``, ``models/clip`` (``text_encoders``), ``models/versatile_diffusion``
    (there only names containing "clip", as the folder also holds the diffuser and VAEs). A choice
    resolves with `resolve_model_path` in the first of `CLIP_FOLDERS` that holds it.
    """
    if not comfy_available():
        return []
    choices: list[str] = []
    for folder in CLIP_FOLDERS:
        for base in _folder_dirs(folder):
            for root, dirs, files in os.walk(base, followlinks=True):
                rel_root = os.path.relpath(root, base)
                if rel_root != "." and _is_hf_folder(root):
                    choices.append(pathlib.PurePath(rel_root).as_posix())
                    dirs[:] = []  # the folder is one choice; its files are not
                    continue
                for name in files:
                    rel = pathlib.PurePath(rel_root, name).as_posix()
                    if os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS and (
                        folder != VD_FOLDER or "clip" in rel.lower()
                    ):
                        choices.append(rel)
    return sorted(dict.fromkeys(choices))


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
    default, SPEC §9).
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


# --------------------------------------------------------------------------- memory management


class _Holder(torch.nn.Module):
    """A container, so that ModelPatcher's bookkeeping attributes land on it, not on our module."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def ensure_on_device(module: torch.nn.Module, device: torch.device) -> None:
    """Move ``module`` to ``device`` if it is elsewhere: two ModelPatchers may share its weights (the
    VD sampler nodes' and the KSampler MODEL's), and one may have offloaded what the other thinks is
    loaded."""
    first = next(module.parameters(), None)
    if first is not None and (first.device.type, first.device.index or 0) != (device.type, device.index or 0):
        log.debug("moving %s to %s", type(module).__name__, device)
        module.to(device)


@functools.cache
def _full_load_patcher_class():
    """A ModelPatcher that always loads whole: our modules are plain ``torch.nn`` layers, which
    ComfyUI's partial (lowvram) loading would leave on the wrong device (docs/comfyui.md)."""
    import comfy.model_patcher

    class FullLoadPatcher(comfy.model_patcher.ModelPatcher):
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            super().load(device_to, lowvram_model_memory, force_patch_weights, full_load=True)

    return FullLoadPatcher


class ManagedModule:
    """A module under ComfyUI's memory management; ``use()`` returns it on the compute device.

    Inside ComfyUI the module is wrapped in a ModelPatcher: loading it may unload other models, it
    is moved back to the offload device when ComfyUI needs the memory, and "Free model memory"
    releases it. Without ComfyUI, ``use()`` moves the module to `compute_device()`.
    Also a context manager: ``with managed(m) as module: ...``.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.patcher = None
        if comfy_available():
            self.patcher = _full_load_patcher_class()(_Holder(module), compute_device(), offload_device())

    def use(self, memory_required: int = 0) -> torch.nn.Module:
        """The module on the compute device; ``memory_required``: bytes to keep free for activations."""
        if self.patcher is None:
            return self.module.to(compute_device())
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        ensure_on_device(self.module, torch.device(self.patcher.load_device))
        return self.module

    def __enter__(self) -> torch.nn.Module:
        return self.use()

    def __exit__(self, *exc) -> None:  # ComfyUI offloads on its own schedule
        return None


def managed(module: torch.nn.Module) -> ManagedModule:
    """Wrap ``module`` for ComfyUI's memory management (see `ManagedModule`)."""
    return ManagedModule(module)


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


# --------------------------------------------------------------------------- core VAE


def _comfy_vae_config(config) -> dict:
    """ComfyUI's AutoencoderKL config for vd_core's `ImageVAEConfig` (sizes read off the shapes;
    ComfyUI's own detection assumes the full-size widths, which the tiny test model lacks)."""
    resolution = 256  # ComfyUI places attention by resolution: level i runs at 256 / 2^i
    ddconfig = {
        "double_z": True, "z_channels": config.z_channels, "resolution": resolution,
        "in_channels": config.in_channels, "out_ch": config.out_channels, "ch": config.ch,
        "ch_mult": list(config.ch_mult), "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [resolution // 2**i for i in config.attn_levels], "dropout": 0.0,
    }
    return {"params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig}}


def core_vae(image_vae_state_dict: dict[str, torch.Tensor]) -> object:
    """A VAE for core VAE Decode/Encode (tiled too) from a kl-f8 state dict in LDM key format
    (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, no prefix: ``kl-f8.pth``
    or ``ImageVAE.state_dict()``). Outside ComfyUI, a `PlainVAE`.

    Raises:
        CheckpointError: not a kl-f8 VAE state dict (names a few missing/unexpected keys).
    """
    from ..vd_core.image_vae import ImageVAE, ImageVAEConfig
    from .comfy_images import PlainVAE

    sd = dict(image_vae_state_dict)
    config = ImageVAEConfig.from_state_dict(sd, "the image VAE weights")
    if comfy_available():
        import comfy.sd

        vae = comfy.sd.VAE(sd=sd, config=_comfy_vae_config(config))
        model = vae.first_stage_model
        vae.downscale_ratio = vae.upscale_ratio = config.downsampling_factor
    else:
        with torch.device("meta"):  # no random init: every weight comes from ``sd``
            model = ImageVAE(config)
        vae = PlainVAE(model)
    what = ("the image VAE weights", "a kl-f8 VAE of their own sizes",
            "Choose kl-f8.pth or a Stable Diffusion 1.x VAE.")
    if isinstance(vae, PlainVAE):
        load_exactly(model, sd, *what)
        model.eval().requires_grad_(False)
    else:  # ComfyUI has loaded the weights non-strictly (it only logs missing keys): compare them here
        check_same_keys(model, sd, *what)
    return vae


# --------------------------------------------------------------------------- VD as a ComfyUI MODEL


@functools.cache
def _vd_model_classes():
    """The BaseModel subclass and its config: SD1's schedule and latent format (VD uses both, SPEC §2)."""
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class VDModelConfig(comfy.supported_models_base.BASE):
        unet_extra_config = {}  # BASE's SD-UNet head settings do not apply to our adapter
        latent_format = comfy.latent_formats.SD15
        sampling_settings = {}  # linear betas 0.00085→0.012 over 1000 steps, eps: VD's schedule
        memory_usage_factor = 1.0  # as SD1, whose image UNet VD's image layers are

    class VDBaseModel(comfy.model_base.BaseModel):
        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)  # the primary tokens → c_crossattn
            if kwargs.get(COND_KINDS) is not None:
                # Constants only batch with equal values, so cond and uncond of other kinds or ratios
                # run separately; the extra contexts batch like CONDList (equal shapes).
                out[COND_KINDS] = comfy.conds.CONDConstant(tuple(kwargs[COND_KINDS]))
                out[COND_RATIOS] = comfy.conds.CONDConstant(tuple(kwargs[COND_RATIOS]))
                out[COND_EXTRA] = comfy.conds.CONDList(list(kwargs.get(COND_EXTRA) or []))
            return out

    return VDModelConfig, VDBaseModel


def comfy_model(unet: torch.nn.Module) -> object:
    """A ComfyUI ``MODEL`` (ModelPatcher over a BaseModel, eps prediction, SD1.5 latent format) whose
    diffusion model is ``unet``, called as ``unet(x, t, context=..., vd_kinds=..., vd_ratios=...,
    vd_extra_contexts=..., control=..., transformer_options=...)`` and exposing ``.dtype``.

    Raises:
        VDError: ComfyUI is not available (a MODEL only means something to ComfyUI's samplers).
    """
    if not comfy_available():
        raise VDError("a ComfyUI MODEL can only be made inside ComfyUI; outside it use vd_core's samplers.")
    import comfy.model_base

    config_class, model_class = _vd_model_classes()
    # The UNet is our adapter, attached after construction instead of built from a config.
    config = config_class({"disable_unet_model_creation": True})
    model = model_class(config, comfy.model_base.ModelType.EPS, device=offload_device())
    model.diffusion_model = unet
    return _full_load_patcher_class()(model, compute_device(), offload_device())
