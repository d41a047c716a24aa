"""The command line: ``python -m vd_core <flow> --models DIR …`` and ``python -m vd_core download``.

Every flow of :mod:`vd_core.flows` is a sub-command writing images (PNG, JPEG or WebP, as the
``--out`` extension says) or a TXT file (one sentence per line). What happens to existing files is
:mod:`vd_core.output_files`' rules (docs/cli.md): inputs are never overwritten, existing outputs
only with ``--overwrite``, and every output path is checked before sampling. Ctrl-C stops sampling
between two steps (a second Ctrl-C aborts at once); Ctrl-C and SIGTERM leave no partial file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import acceleration
from .errors import Cancelled, VDError, VDInputError
from .flows import ImageSlot, SamplingOptions
from .flows.image_prep import resize_images, resize_masks, resolve_output_size
from .flows.sampling import check_count
from .memory_budget import check_image_run_fits
from .flows.options import SAMPLER_NAMES, SCHEDULER_NAMES
from .image_io import image_format, read_image_file, read_mask_file, write_image_file
from .output_files import (
    ReservedOutputs,
    TerminateAsError,
    Terminated,
    check_outputs,
    output_paths,
    probe_output_folders,
    write_atomically,
)
from .validation import check_device, check_seed

log = logging.getLogger("vd_core")

EXIT_ERROR, EXIT_CANCELLED, EXIT_TERMINATED = 1, 130, 143
__all__ = ["main", "build_parser", "parse_slot", "output_paths", "write_atomically"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# sub-command → (flow function name, output kind, help)
COMMANDS = {
    "text-to-image": ("text_to_image", "png", "generate images from a prompt"),
    "image-variation": ("image_variation", "png", "generate variations of an image"),
    "image-to-text": ("image_to_text", "txt", "describe an image with sampled sentences"),
    "text-variation": ("text_variation", "txt", "generate sentences related to a prompt"),
    "dual-context": ("dual_context", "png", "generate images guided by an image and a prompt"),
    "multi-context": ("multi_context", "png", "generate images guided by several images (masks optional) and a prompt"),
    "edit-image": ("edit_image_with_text", "png", "edit an image through its description (I2T2I)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vd_core",
        description="Versatile Diffusion (Xu et al., arXiv 2211.08332): text→image, image variation, "
        "image→text, text variation and multi-context generation with one model.",
        epilog="Model folder: vd-four-flow-v1-0-fp16.pth, kl-f8.pth, optimus-vae.pth and clip-vit-large-patch14/ "
        "(python -m vd_core download --models DIR fetches them). Example: python -m vd_core text-to-image "
        "--models models/vd --prompt 'a red car' --out car.png",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, kind, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(sub, kind)
        _add_flow_arguments(name, sub)
    dl = commands.add_parser("download", help="fetch the model files from the Hugging Face hub",
                             description="Fetch the released VD files (about 7.5 GB) into the model folder.")
    dl.add_argument("--models", required=True, type=Path, help="model folder to fill (created if needed)")
    dl.add_argument("--fp32", action="store_true", help="the float32 diffuser instead of the released fp16 one")
    dl.add_argument("--dry-run", action="store_true", help="show what would be fetched, fetch nothing")
    return parser


def _add_common(sub: argparse.ArgumentParser, kind: str) -> None:
    sub.add_argument("--models", required=True, type=Path, help="folder with the VD model files")
    default_out = "vd.png" if kind == "png" else "vd.txt"
    formats = ".png, .jpg/.jpeg or .webp: the format written" if kind == "png" else "a .txt file"
    sub.add_argument("--out", type=Path, default=Path(default_out),
                     help=f"output file (default {default_out}; {formats}); several images get _0, _1, … before the "
                     "suffix. Existing files are never replaced without --overwrite; inputs never")
    sub.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input file)")
    sub.add_argument("-n", type=int, default=2 if kind == "png" else 4, help="number of results")
    sub.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    sub.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale 0 … 100 (default 7.5; 1 = none)")
    sub.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim", help="ddim is the official sampler")
    sub.add_argument("--scheduler", choices=SCHEDULER_NAMES, default="uniform", help="sigmas of the k-samplers")
    sub.add_argument("--eta", type=float, default=None,
                     help="fresh noise per step (default: 0 for ddim, 1 for euler_ancestral)")
    sub.add_argument("--seed", type=int, default=20, help="seed 0 … 2**64−1 (default 20, the WebUI's)")
    sub.add_argument("--per-item-seeds", action="store_true", help="result i uses seed+i (ComfyUI style)")
    sub.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps … (default: cuda when available)")
    sub.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto", help="default fp16 on GPU, fp32 on CPU")
    sub.add_argument("--fast", action="store_true",
                     help="GPU fast paths for the diffuser: channels-last weights and CUDA graphs (same results)")
    sub.add_argument("--compile", action="store_true",
                     help="also torch.compile the diffuser (the first run compiles for minutes; cached afterwards)")
    sub.add_argument("--compile-cache", type=Path, default=acceleration.DEFAULT_COMPILE_CACHE,
                     help=f"where --compile keeps compiled kernels (default {acceleration.DEFAULT_COMPILE_CACHE})")
    sub.add_argument("-v", "--verbose", action="store_true", help="log every step")


def _add_flow_arguments(name: str, sub: argparse.ArgumentParser) -> None:
    image_input = name in ("image-variation", "image-to-text", "dual-context", "edit-image")
    if image_input:
        sub.add_argument("--image", required=True, type=Path, help="input image file")
    if name == "multi-context":
        sub.add_argument("--image", required=True, action="append", dest="slots", metavar="PATH[,mask=M][,weight=W][,focus=F]",
                         help="an image slot, repeatable; mask: a grayscale image, white = keep")
    if name in ("text-to-image", "text-variation"):
        sub.add_argument("--prompt", required=True, help="the prompt")
    if name in ("dual-context", "multi-context"):
        sub.add_argument("--prompt", default="", help="optional prompt")
        sub.add_argument("--text-strength", type=float, default=0.0, help="prompt share 0…1 (default 0: images only)")
    if name in ("text-to-image", "text-variation", "dual-context", "multi-context"):
        sub.add_argument("--negative", default="", help="negative prompt (default: empty, as the official)")
    if name in ("image-variation", "dual-context"):
        sub.add_argument("--focus", type=float, default=0.5, help="0 semantic … 0.5 neutral … 1 style")
    if name == "image-variation":
        sub.add_argument("--fidelity", type=float, default=0.0, help="0 new image … 1 the input itself")
    if name in ("image-variation", "edit-image"):
        sub.add_argument("--color-adjust", choices=("simple", "none"), default="simple",
                         help="match the output colours to the input (default simple)")
    if name in ("image-to-text", "text-variation"):
        sub.add_argument("--no-clean-up", action="store_true", help="keep repeated words")
    if name == "edit-image":
        sub.add_argument("--positive", required=True, help="what the edited image should show")
        sub.add_argument("--negative", default="", help="what to remove from the image's description")
    if COMMANDS[name][1] == "png":
        sub.add_argument("--width", type=int, help="output width, any multiple of 8 (default: from the input or 512)")
        sub.add_argument("--height", type=int, help="output height, any multiple of 8 (default: from the input or 512)")
    if name in ("text-to-image", "dual-context", "multi-context", "edit-image"):
        sub.add_argument("--init-image", type=Path, help="start from this image instead of noise")
        sub.add_argument("--denoise", type=float, default=1.0, help="with --init-image: 0 keep … 1 replace (default 1)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, format="%(message)s")
    try:
        with TerminateAsError():
            if args.command == "download":
                return _download(args)
            return _generate(args)
    except Terminated:
        sys.stderr.write("terminated; no output written\n")
        return EXIT_TERMINATED
    except Cancelled:
        sys.stderr.write("cancelled; no output written\n")
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; no output written\n")
        return EXIT_CANCELLED
    except VDError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_ERROR


def _download(args) -> int:
    from .download import download, plan_downloads

    paths = download(args.models, plan_downloads(fp32=args.fp32), dry_run=args.dry_run)
    log.info("%s %d files in %s", "would fetch" if args.dry_run else "ready:", len(paths), args.models)
    return 0


def _generate(args) -> int:
    flow_name, kind, _ = COMMANDS[args.command]
    device, dtype = _placement(args.device, args.dtype)
    check_seed(args.seed, "--seed")
    check_count(args.n, "-n")
    inputs = _flow_inputs(args)  # read input files before the (slow) model loading
    targets = [args.out] if kind == "txt" else output_paths(args.out, args.n)
    check_outputs(targets, inputs=_input_paths(args), overwrite=args.overwrite, kind="text" if kind == "txt" else "image")
    init = _read_image(args.init_image) if getattr(args, "init_image", None) is not None else None
    width, height = _output_size(args, inputs, init) if kind == "png" else (0, 0)
    reserve = 3 * width * height + 4096  # bytes per output file, uncompressed
    probe_output_folders(targets, reserve * len(targets))
    from .models import load_models  # looked up at call time (tests replace it)

    models = load_models(args.models, flows=(flow_name,), device=device, dtype=dtype)
    if args.fast or args.compile:
        models.diffuser = _accelerated(models.diffuser, device, args)
    if kind == "png":
        # before the outputs are reserved and anything of the run is allocated
        check_image_run_fits(args.n, width, height, device=device, dtype=dtype,
                             model_channels=models.diffuser.config.model_channels,
                             vae_channels=models.require("image_vae", args.command).config.ch,
                             guided=args.guidance != 1)
    # Reserve the outputs now: an unwritable folder or a full disk fails before sampling.
    with ReservedOutputs(targets, reserve_bytes=reserve, overwrite=args.overwrite) as outputs:
        return _run(args, flow_name, kind, device, dtype, inputs, init, outputs, models)


def _output_size(args, inputs, init) -> tuple[int, int]:
    """The output size the flow will use: --width/--height, else the init image's (cropped to a
    multiple of 8), else from the input image's aspect ratio, else 512×512."""
    if init is not None:
        return args.width or init.shape[-1] // 8 * 8, args.height or init.shape[-2] // 8 * 8
    image = inputs.get("image")
    if image is None and inputs.get("slots"):
        image = inputs["slots"][0].image
    if image is None:
        return args.width or 512, args.height or 512
    return resolve_output_size(image, args.width, args.height)


def _run(args, flow_name, kind, device, dtype, inputs, init, outputs, models) -> int:
    from . import flows

    targets = outputs.targets
    if init is not None:
        size = (args.width or init.shape[-1] // 8 * 8, args.height or init.shape[-2] // 8 * 8)
        inputs["init_latent"] = models.require("image_vae", "--init-image").encode(resize_images(init, *size))
        inputs["denoise"] = args.denoise
        inputs["width"], inputs["height"] = size
    with _CancelOnInterrupt() as cancel:
        options = SamplingOptions(
            steps=args.steps, guidance=args.guidance, sampler=args.sampler, scheduler=args.scheduler, eta=args.eta,
            seed=args.seed, per_item_seeds=args.per_item_seeds, callback=report_progress,
            cancel=cancel, device=device, dtype=dtype,
        )
        result = getattr(flows, flow_name)(models, n=args.n, options=options, **inputs)
    if kind == "txt":
        outputs.commit(lambda paths: Path(paths[0]).write_text("\n".join(result) + "\n", encoding="utf-8"))
        for line in result:
            sys.stdout.write(line + "\n")
        log.info("wrote %s", args.out)
        return 0
    if result.images.shape[0] != len(targets):
        raise VDError(f"the flow returned {result.images.shape[0]} images for {len(targets)} outputs")
    outputs.commit(lambda paths: [write_image_file(img, p, image_format(t)) for img, p, t in zip(result.images, paths, targets)])
    log.info("wrote %s", ", ".join(str(t) for t in targets))
    return 0


def _input_paths(args) -> list[Path]:
    """Every file the command line reads (never to be overwritten)."""
    paths = [getattr(args, name, None) for name in ("image", "init_image")]
    for spec in getattr(args, "slots", None) or []:
        path, *options = spec.split(",")
        paths.append(Path(path))
        paths += [Path(o.partition("=")[2].strip()) for o in options if o.strip().startswith("mask=")]
    return [Path(p) for p in paths if p is not None]


def _flow_inputs(args) -> dict:
    """Keyword arguments of the flow function from the parsed command line."""
    names = ("prompt", "negative", "text_strength", "focus", "fidelity", "color_adjust", "positive", "width", "height")
    inputs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if hasattr(args, "no_clean_up"):
        inputs["clean_up"] = not args.no_clean_up
    if hasattr(args, "image"):
        inputs["image"] = _read_image(args.image)
    if hasattr(args, "slots"):
        inputs["slots"] = [parse_slot(spec) for spec in args.slots]
    return inputs


def parse_slot(spec: str) -> ImageSlot:
    """``PATH[,mask=M][,weight=W][,focus=F]`` → :class:`ImageSlot` (mask file: white = keep)."""
    path, *options = spec.split(",")
    values = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key.strip() not in ("mask", "weight", "focus"):
            raise VDInputError(f"--image {spec!r}: expected PATH[,mask=M][,weight=W][,focus=F], got {option!r}")
        values[key.strip()] = value.strip()
    image = _read_image(Path(path))
    mask = None
    if "mask" in values:
        mask = _read_mask(Path(values["mask"]))
        mask = resize_masks(mask, image.shape[-1], image.shape[-2])
    try:
        return ImageSlot(image, mask, float(values.get("weight", 1.0)), float(values.get("focus", 0.5)))
    except ValueError as exc:
        raise VDInputError(f"--image {spec!r}: weight and focus must be numbers ({exc})") from exc


class _CancelOnInterrupt:
    """While active, the first Ctrl-C asks the sampler to stop between steps; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        sys.stderr.write("\nstopping after this step (Ctrl-C again to abort)\n")

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


def report_progress(step: int, total: int, x: torch.Tensor, x0_estimate: torch.Tensor) -> None:
    """The sampler callback: one log line per step (shown with --verbose)."""
    log.debug("step %d/%d", step + 1, total)


def _accelerated(diffuser, device: torch.device, args):
    """The diffuser behind the fast paths asked for (``vd_core.acceleration``); channels-last and
    CUDA graphs only pay on a GPU, so ``--fast`` changes nothing on the CPU."""
    on_gpu = device.type == "cuda"
    if args.fast and not on_gpu:
        log.info("--fast: channels-last and CUDA graphs only pay on a CUDA GPU; running the plain diffuser")
    return acceleration.accelerate_diffuser(
        diffuser,
        channels_last=args.fast and on_gpu,
        cuda_graphs=args.fast and on_gpu,
        compile=args.compile,
        cache_dir=args.compile_cache if args.compile else None,
    )


def _placement(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(device)
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, DTYPES[dtype]


def _read_image(path: Path) -> torch.Tensor:
    """An image file → ``(1, 3, H, W)`` float in [0, 1] (``vd_core.image_io``: every PIL mode)."""
    return read_image_file(path)


def _read_mask(path: Path) -> torch.Tensor:
    """A mask file → ``(1, 1, H, W)`` in [0, 1], white = keep."""
    return read_mask_file(path)
