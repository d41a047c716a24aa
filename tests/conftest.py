"""Shared fixtures: the reference folder (``$VD_REFERENCE_DIR``) and its tensor files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The tiny models are far too small to gain from intra-op threads, and on a busy 2-core machine
# extra threads thrash (measured 5-50x slower). VD_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("VD_TEST_THREADS", "1")))


# Fixtures of the node tests (the tiny release model loaded through the nodes).
pytest_plugins = ["comfy_runtime", "node_fixtures"]


def reference_dir() -> Path:
    return Path(os.environ.get("VD_REFERENCE_DIR", ROOT.parent / "shared" / "vd_reference")).resolve()


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    """The vd_reference folder; tests that need it skip cleanly when it is absent."""
    path = reference_dir()
    if not (path / "tiny" / "weights.safetensors").is_file():
        pytest.skip(f"reference fixtures not found at {path} (set VD_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_dir(ref_dir) -> Path:
    return ref_dir / "tiny"


@pytest.fixture(scope="session")
def release_dir(ref_dir) -> Path:
    path = ref_dir / "tiny_release"
    if not (path / "vd-four-flow-v1-0-fp16.pth").is_file():
        pytest.skip(f"release-layout fixtures not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())["tiny"]


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="session")
def tiny_weights(tiny_dir) -> dict:
    return load_tensors(tiny_dir / "weights.safetensors")


@pytest.fixture(scope="session")
def tiny_inputs(tiny_dir) -> dict:
    return load_tensors(tiny_dir / "inputs.safetensors")


# apply_model.safetensors cases (descriptions in tiny/index.json): data input, [(context kind, ratio)].
APPLY_MODEL_CASES = {
    "eps_image_textctx": ("x_image", [("text", 1.0)]),
    "eps_image_imagectx": ("x_image", [("image", 1.0)]),
    "eps_text_textctx": ("x_text", [("text", 1.0)]),
    "eps_text_imagectx": ("x_text", [("image", 1.0)]),
    "eps_image_mc_text0p3_image0p7": ("x_image", [("text", 0.3), ("image", 0.7)]),
    "eps_image_mc_text1_image3": ("x_image", [("text", 1.0), ("image", 3.0)]),
    "eps_image_mc_text_only": ("x_image", [("text", 0.5)]),
}


def contexts_for(spec, inputs, dtype=torch.float32):
    """``[(kind, ratio)]`` → the fixture's random context tokens as ``ContextInput`` s."""
    from vd_core.diffuser import ContextInput

    tokens = {"text": inputs["ctx_text_rand"], "image": inputs["ctx_image_rand"]}
    return [ContextInput(kind, tokens[kind].to(dtype), ratio) for kind, ratio in spec]


@pytest.fixture(scope="module")
def tiny_state(tiny_weights) -> dict:
    """The tiny official weights under the diffuser's own keys (``diffuser.`` prefix removed)."""
    from vd_core.checkpoint import strip_prefix

    return strip_prefix(tiny_weights, "diffuser.")


@pytest.fixture(scope="module")
def tiny_model(tiny_state, tiny_config):
    """The tiny official diffuser, loaded strictly, in eval mode (one per test module)."""
    from vd_core.diffuser import DiffuserConfig, FourFlowDiffuser

    config = DiffuserConfig.from_state_dict(tiny_state, num_heads=tiny_config["diffuser_image"]["num_heads"])
    model = FourFlowDiffuser(config)
    model.load_state_dict(tiny_state, strict=True)
    return model.eval().requires_grad_(False)


def assert_close_ref(actual, expected, rel: float = 1e-4, what: str = ""):
    """The README's parity rule: ``max|Δ| ≤ rel · max(1, max|ref|)``."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = rel * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max|Δ| = {err:.3e} > {bound:.3e}"
    return err
