"""How node failures reach the user: every message starts with the node's display name.

ComfyUI shows an exception's type and message in its error dialog. Node bodies run inside
:func:`reported_as`, which prefixes the display name to the expected failures (bad files, bad
inputs, missing parts, GPU out of memory), turns ``vd_core``'s ``Cancelled`` into ComfyUI's own
"interrupted" exception, and lets genuine bugs through unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..vd_core.errors import Cancelled, MissingPartError, VDError
from . import comfy_bridge as bridge


@contextmanager
def reported_as(display_name: str):
    """Run a node body so that expected failures read ``"<display_name>: <cause>. <fix>"``."""
    try:
        yield
    except Cancelled:
        bridge.raise_interrupted()
    except torch.OutOfMemoryError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "no detail"
        # Same exception type, so ComfyUI still recognises it as out-of-memory and frees models.
        raise torch.OutOfMemoryError(
            f"{display_name}: out of GPU memory ({first_line}). Lower the batch size or the resolution, "
            "or load the model with dtype fp16."
        ) from exc
    except (VDError, FileNotFoundError) as exc:
        if str(exc).startswith(display_name):
            raise
        raise type(exc)(f"{display_name}: {exc}") from exc


def require_part(part, display_name: str, what: str, loader_input: str, socket: str):
    """``part`` itself, or a ``MissingPartError`` saying which VD Loader input to fill."""
    if part is None:
        raise MissingPartError(
            f"{display_name}: no {what} is loaded. Choose a file in the VD Loader's '{loader_input}' "
            f"input (it is set to 'none') and connect the loader's {socket} output here."
        )
    return part
