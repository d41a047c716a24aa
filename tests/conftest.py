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
pytest_plugins = ["node_fixtures"]


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


def assert_close_ref(actual, expected, rel: float = 1e-4, what: str = ""):
    """The README's parity rule: ``max|Δ| ≤ rel · max(1, max|ref|)``."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = rel * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max|Δ| = {err:.3e} > {bound:.3e}"
    return err
