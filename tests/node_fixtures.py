"""Fixtures shared by the node tests: the pack, the release-layout models loaded by the VD Loader,
and the release fixture's inputs in ComfyUI's layouts.

Node functions run inside ``torch.inference_mode()``, as ComfyUI's executor runs them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tensors
from pack_import import import_pack


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(scope="session")
def nodes(pack):
    """Node id → a fresh instance of its class (ComfyUI instantiates a node before calling it)."""
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="session")
def parts(nodes, release_dir):
    """(vd_model, vd_clip, vd_optimus, vae) of the release-layout miniature, loaded by the VD Loader
    with file paths (outside ComfyUI the bridge takes names as paths)."""
    with torch.inference_mode():
        return nodes["VDLoader"].load(
            diffuser=str(release_dir / "vd-four-flow-v1-0-fp16.pth"),
            optimus=str(release_dir / "optimus-vae.pth"),
            clip=str(release_dir / "clip-vit-large-patch14"),
            image_vae=str(release_dir / "kl-f8.pth"),
            dtype="fp32",
        )


@pytest.fixture(scope="session")
def expected(release_dir):
    """The official outputs on the release files: ``expected[file_stem][tensor]`` plus the JSONs."""
    folder = release_dir / "expected"
    found = {path.stem: load_tensors(path) for path in folder.glob("*.safetensors")}
    found["json"] = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    return found


def comfy_image(path) -> torch.Tensor:
    """A PNG as ComfyUI's Load Image gives it: ``(1, H, W, 3)`` float32 in [0, 1]."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None]


def first_context(output):
    """The single ``GuidedContext`` of a context node's ``(VD_CONTEXT,)`` output."""
    (context,) = output[0]
    return context
