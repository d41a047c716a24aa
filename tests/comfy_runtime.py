"""Pytest plugin: a real ComfyUI in the test process, for the tests that must run inside it.

Configuration (environment):

* ``VD_COMFYUI_DIR`` — a ComfyUI work tree (has ``main.py``), e.g. ``/tmp/ComfyUI``. pytest must
  then run with that ComfyUI's Python (its venv has torch, torchvision and ComfyUI's
  requirements).
* ``VD_COMFY_PYTHON`` — that venv's Python, for the tests that start ComfyUI as a server
  (``tests/test_workflows_in_comfyui.py``); they need both variables.
* ``VD_COMFY_HARNESS`` — the workflow harness folder (default ``<repo>/../shared/comfy_harness``).
* ``CI=true`` — a test that needs ComfyUI FAILS instead of skipping when ComfyUI is not
  configured or does not import, unless ``VD_NO_COMFYUI=1`` says that this run is the one
  without ComfyUI (``.ci/run`` runs the suite both ways; ``VD_COMFYUI_DIR`` is then ignored).

When ``VD_COMFYUI_DIR`` names a work tree, this module, on import (``pytest_plugins``, i.e. before
any test module is collected), puts the tree first on ``sys.path`` (so ``import nodes`` is
ComfyUI's ``nodes.py``, as inside ComfyUI; the pack is imported as ``vd_pack`` by
``pack_import``), sets ``sys.argv = ["main.py", "--cpu"]``, calls
``comfy.options.enable_args_parsing()`` and imports ``comfy.cli_args`` (which parses the command
line once, so a later ``import comfy.model_management`` runs on the CPU instead of looking for a
GPU), then restores ``sys.argv``. If that fails, the tree is taken off ``sys.path`` again and the
error is what the fixtures report.

Fixtures and helpers:

* ``comfy`` (session): a :class:`ComfyRuntime` (skips without ComfyUI; fails under ``CI=true``).
  ``comfy.dir`` (Path), ``comfy.nodes`` (ComfyUI's ``nodes`` module), ``comfy.folder_paths``,
  ``comfy.model_management``; ``comfy.node("KSampler")`` → a fresh instance of a core node
  class (ComfyUI's ``comfy_extras`` nodes — FreeU, SAG, PAG, HyperTile, model merging, … — are
  loaded on first need); ``comfy.register_models(folder_name, path)`` → ``path`` registered first
  among ``folder_paths``' folders of that name for the rest of the session, so a test passes
  plain file names (``"vd-four-flow-v1-0-fp16.pth"``) the way ComfyUI's combo widgets do.
* ``comfy_models`` (function): ``comfy_models(folder_name, path)`` does the same, undone when the
  test ends.
* ``comfy_python`` (session): ``(comfy_dir, python)`` for server runs (skip / fail as above).
* :func:`unavailable` (``reason``): ``pytest.skip`` locally, ``pytest.fail`` under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def in_ci() -> bool:
    return _flag("CI")


def without_comfyui() -> bool:
    """``VD_NO_COMFYUI=1``: this run is meant to have no ComfyUI."""
    return _flag("VD_NO_COMFYUI")


def configured_dir() -> str:
    """``$VD_COMFYUI_DIR``, or '' when unset or when ``VD_NO_COMFYUI=1``."""
    return "" if without_comfyui() else os.environ.get("VD_COMFYUI_DIR", "").strip()


def unavailable(reason: str):
    """Skip a test that needs ComfyUI; under CI=true fail it, unless this run is the one without
    ComfyUI (``VD_NO_COMFYUI=1``)."""
    if in_ci() and not without_comfyui():
        pytest.fail(f"CI=true and ComfyUI is needed: {reason}", pytrace=False)
    pytest.skip(reason)


def _start_in_process(comfy_dir: str) -> str | None:
    """Make ``comfy_dir`` importable on the CPU; the error text, or None when it worked."""
    if not (Path(comfy_dir) / "main.py").is_file():
        return f"VD_COMFYUI_DIR={comfy_dir} is not a ComfyUI work tree (no main.py)"
    added = comfy_dir not in sys.path
    if added:
        sys.path.insert(0, comfy_dir)
    argv, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # parses sys.argv now, once
    except Exception as error:  # noqa: BLE001  (any failure: report it through the fixtures)
        if added:
            sys.path.remove(comfy_dir)
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            del sys.modules[name]
        return (f"ComfyUI at {comfy_dir} does not import with {sys.executable} "
                f"({type(error).__name__}: {error}); run pytest with ComfyUI's venv Python")
    finally:
        sys.argv = argv
    return None


COMFY_DIR = configured_dir()
START_ERROR = _start_in_process(COMFY_DIR) if COMFY_DIR else None


def pytest_report_header(config):
    if not COMFY_DIR:
        return "ComfyUI: not configured (set VD_COMFYUI_DIR to test inside ComfyUI)"
    return f"ComfyUI: {COMFY_DIR} " + (f"UNUSABLE: {START_ERROR}" if START_ERROR else "(in-process, --cpu)")


class ComfyRuntime:
    """ComfyUI imported in this process (see the module docstring)."""

    def __init__(self, comfy_dir: str):
        self.dir = Path(comfy_dir)
        self.folder_paths = importlib.import_module("folder_paths")
        self.model_management = importlib.import_module("comfy.model_management")
        self.nodes = importlib.import_module("nodes")
        if Path(self.nodes.__file__).resolve().parent != self.dir.resolve():
            raise RuntimeError(f"`import nodes` gave {self.nodes.__file__}, not ComfyUI's nodes.py")
        self._extras_loaded = False

    def load_extra_nodes(self) -> None:
        """Register ComfyUI's own ``comfy_extras`` nodes (no custom nodes, no API nodes), once."""
        if not self._extras_loaded:
            asyncio.run(self.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            self._extras_loaded = True

    def node(self, class_name: str):
        """A fresh instance of the core node class ``class_name`` (e.g. ``"KSampler"``, ``"FreeU_V2"``)."""
        if class_name not in self.nodes.NODE_CLASS_MAPPINGS:
            self.load_extra_nodes()
        return self.nodes.NODE_CLASS_MAPPINGS[class_name]()

    def register_models(self, folder_name: str, path) -> Path:
        """Search ``path`` first for ``folder_name`` (``"versatile_diffusion"``, ``"vae"``,
        ``"clip_vision"``, ``"loras"``, ``"controlnet"`` …) for the rest of the session."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"register_models: {path} is not a folder")
        self.folder_paths.add_model_folder_path(folder_name, str(path), is_default=True)
        return path


_runtime: ComfyRuntime | None = None


def runtime() -> ComfyRuntime:
    """The in-process ComfyUI, or skip/fail (:func:`unavailable`) with the reason."""
    global _runtime
    if not COMFY_DIR:
        unavailable("set VD_COMFYUI_DIR to a ComfyUI work tree (and run pytest with its Python) to test inside ComfyUI")
    if START_ERROR:
        unavailable(START_ERROR)
    if _runtime is None:
        _runtime = ComfyRuntime(COMFY_DIR)
    return _runtime


@pytest.fixture(scope="session")
def comfy() -> ComfyRuntime:
    return runtime()


@pytest.fixture
def comfy_models(comfy):
    """``comfy_models(folder_name, path)``: like ``comfy.register_models``, undone after the test."""
    saved = {}

    def register(folder_name: str, path) -> Path:
        name = comfy.folder_paths.map_legacy(folder_name)
        if name not in saved:
            entry = comfy.folder_paths.folder_names_and_paths.get(name)
            saved[name] = None if entry is None else (list(entry[0]), entry[1])
        return comfy.register_models(name, path)

    yield register
    for name, entry in saved.items():
        if entry is None:
            comfy.folder_paths.folder_names_and_paths.pop(name, None)
        else:
            comfy.folder_paths.folder_names_and_paths[name] = entry
        comfy.folder_paths.filename_list_cache.pop(name, None)


@pytest.fixture(scope="session")
def comfy_python() -> tuple[Path, Path]:
    """``(ComfyUI dir, its Python)`` for tests that start ComfyUI as a server."""
    python = os.environ.get("VD_COMFY_PYTHON", "").strip()
    if not COMFY_DIR or not python:
        unavailable("set VD_COMFYUI_DIR and VD_COMFY_PYTHON (ComfyUI's venv Python) to run workflows in ComfyUI")
    if not (Path(COMFY_DIR) / "main.py").is_file():
        unavailable(f"VD_COMFYUI_DIR={COMFY_DIR} is not a ComfyUI work tree (no main.py)")
    if not os.access(python, os.X_OK):
        unavailable(f"VD_COMFY_PYTHON={python} is not an executable")
    return Path(COMFY_DIR), Path(python)
