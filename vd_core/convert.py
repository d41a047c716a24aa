"""Convert a VD diffuser file of any supported layout to a pickle-free ``.safetensors`` file.

    python -m vd_core.convert SRC DST.safetensors [--dtype fp16|bf16|fp32] [--force]

The output holds the current ``diffuser.image.*`` / ``diffuser.text.*`` keys (the release's
names) of every diffuser part SRC contains, checked strictly against the model layout first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from .diffuser.config import RELEASE_NUM_HEADS, DiffuserConfig
from .diffuser.four_flow import FourFlowDiffuser
from .diffuser.loading import WHAT, parts_in_state, read_diffuser_state_dict, select_parts
from .errors import CheckpointError, VDInputError

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_diffuser(
    src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write the diffuser weights of ``src`` to ``dst`` (``.safetensors``) in the current key layout.

    Args:
        src: any file :func:`vd_core.diffuser.load_diffuser` reads (release ``.pth``, all-in-one,
            pre-2023 layout, ``.safetensors``).
        dst: output path ending in ``.safetensors``; written to a temporary file in the same folder
            and renamed, so an interrupted run leaves nothing half-written.
        dtype: floating dtype of the output; None keeps the file's.
        overwrite: replace an existing ``dst``.

    Returns:
        ``dst`` as a Path.

    Raises:
        CheckpointError: ``src`` is unreadable or not a VD diffuser.
        VDInputError: ``dst`` has the wrong suffix, exists (without ``overwrite``) or is ``src``.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise VDInputError(f"output {dst} must end in .safetensors")
    if dst.exists() and dst.resolve() == src.resolve():
        raise VDInputError(f"output {dst} is the input file; choose another name")
    if dst.exists() and not overwrite:
        raise VDInputError(f"output {dst} exists; pass --force (overwrite=True) to replace it")
    if not dst.parent.is_dir():
        raise VDInputError(f"output folder {dst.parent} does not exist")

    state = read_diffuser_state_dict(src)
    # Validate against the model layout without allocating it: sizes from the shapes, strict keys.
    config = DiffuserConfig.from_state_dict(state, num_heads=RELEASE_NUM_HEADS, source=f"{WHAT} {src}")
    with torch.device("meta"):
        model = FourFlowDiffuser(config, parts_in_state(state))
    wanted = select_parts(state, model, src)
    tensors = {f"diffuser.{k}": wanted[k].to(dtype or wanted[k].dtype).contiguous() for k in model.state_dict()}

    # Same folder, so the rename is atomic; a plain new file, so it gets the usual permissions.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "converted_from": src.name})
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %d tensors (%s) to %s", len(tensors), model.parts, dst)
    return dst


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vd_core.convert",
        description=(
            "Convert a Versatile Diffusion diffuser checkpoint (vd-four-flow-v1-0[-fp16].pth, an all-in-one VD "
            "state dict, or the pre-2023 model.diffusion_model.unet_* layout) to a pickle-free .safetensors "
            "file with the release's diffuser.* key names. The file is checked against the model layout first."
        ),
    )
    parser.add_argument("src", type=Path, help="input checkpoint (.pth, .ckpt, .bin or .safetensors)")
    parser.add_argument("dst", type=Path, help="output file, ending in .safetensors")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="floating dtype of the output (default: keep the input's)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion refused or failed)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_diffuser(args.src, args.dst, DTYPES.get(args.dtype), overwrite=args.force)
    except (CheckpointError, VDInputError) as exc:
        log.error("error: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
