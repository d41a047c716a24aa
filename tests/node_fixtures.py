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
def release_models(comfy, pack, release_dir):
    """The in-process ComfyUI (``comfy_runtime.py``) with the release miniature registered as the
    ``versatile_diffusion`` and ``clip_vision`` model folders, so node inputs are file names, as
    in ComfyUI's lists. Skips without ComfyUI (fails under CI=true)."""
    pack.nodes.comfy_bridge.register_model_folders()
    for folder in ("versatile_diffusion", "clip_vision"):
        comfy.register_models(folder, release_dir)
    return comfy


RELEASE_FILES = dict(diffuser="vd-four-flow-v1-0-fp16.pth", optimus="optimus-vae.pth", clip="clip-vit-large-patch14",
                     image_vae="kl-f8.pth")


@pytest.fixture(scope="session")
def parts(nodes, release_models):
    """(model, text_model, vd_clip, vd_optimus, vae) of the release-layout miniature, loaded by the VD
    Loader inside ComfyUI with both kinds of context layers for both flows."""
    with torch.inference_mode():
        return nodes["VDLoader"].load(image_model="text+image", text_model="text+image", dtype="fp32", **RELEASE_FILES)


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
