"""ComfyUI entry point of the Versatile Diffusion node pack.

ComfyUI imports this folder as a package and reads ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``. Importing does no model work: files are read when a VD Loader runs.
The algorithm lives in ``vd_core`` (plain PyTorch, usable without ComfyUI).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Served at /extensions/<this folder>/: the text-on-node script (web/js) and the help pages (web/docs).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
