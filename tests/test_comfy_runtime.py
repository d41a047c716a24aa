"""The in-process ComfyUI test support (``tests/comfy_runtime.py``): when tests skip and when they
fail, and, inside ComfyUI, what the ``comfy`` fixture gives."""

from __future__ import annotations

import os

import pytest
import torch

import comfy_runtime


@pytest.mark.parametrize(
    "ci, no_comfyui, outcome",
    [("", "", "skip"), ("true", "", "fail"), ("true", "1", "skip"), ("false", "", "skip"), ("1", "0", "fail")],
)
def test_unavailable_skips_locally_and_fails_in_ci(monkeypatch, ci, no_comfyui, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("VD_NO_COMFYUI", no_comfyui)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="because"):
        comfy_runtime.unavailable("because")


def test_a_run_without_comfyui_ignores_the_comfyui_dir(monkeypatch):
    monkeypatch.setenv("VD_COMFYUI_DIR", "/opt/ComfyUI")
    monkeypatch.setenv("VD_NO_COMFYUI", "1")
    assert comfy_runtime.configured_dir() == ""
    monkeypatch.setenv("VD_NO_COMFYUI", "")
    assert comfy_runtime.configured_dir() == "/opt/ComfyUI"


# ------------------------------------------------------------------------- inside a real ComfyUI


def test_inside_comfyui_runs_on_the_cpu_with_comfyuis_nodes(comfy):
    assert comfy.model_management.get_torch_device() == torch.device("cpu")
    assert comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU
    assert "KSampler" in comfy.nodes.NODE_CLASS_MAPPINGS
    assert type(comfy.node("FreeU_V2")).__name__ == "FreeU_V2"  # a comfy_extras node, loaded on demand


def test_inside_comfyui_registered_folders_resolve_plain_file_names(comfy, comfy_models, release_dir, tmp_path):
    name = "vd-four-flow-v1-0-fp16.pth"
    folder = "vd_runtime_test_folder"
    comfy_models(folder, release_dir)
    assert comfy.folder_paths.get_full_path(folder, name) == os.path.join(str(release_dir.resolve()), name)
    assert name in comfy.folder_paths.get_filename_list(folder)
    (tmp_path / name).write_bytes(b"")
    comfy_models(folder, tmp_path)  # registered last = searched first
    assert comfy.folder_paths.get_full_path(folder, name) == str(tmp_path.resolve() / name)


def test_inside_comfyui_test_folders_are_undone_after_a_test(comfy):
    assert "vd_runtime_test_folder" not in comfy.folder_paths.folder_names_and_paths
