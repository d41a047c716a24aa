"""VD Speed Up keeps to itself: it never changes the loader's (cached, shared) output, its
compile cache lives under ComfyUI's user directory, and CUDA graphs are off by default."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from pack_import import import_pack

pack = import_pack()
speed = pack.nodes.speed
LoadedPart = pack.nodes.types.LoadedPart


@pytest.fixture
def loaded():
    """A one-level four-flow diffuser with convolutions, as the loader hands it on."""
    diffuser_mod = pack.vd_core.diffuser
    config = diffuser_mod.DiffuserConfig(32, (1,), (1,), (True,), 24, in_channels=4, out_channels=4, num_heads=2)
    torch.manual_seed(0)
    module = diffuser_mod.FourFlowDiffuser(config, diffuser_mod.DiffuserParts.for_flow("image", ["text"])).eval()
    return LoadedPart.manage(module, "VD_test_diffuser", "vd-four-flow-v1-0-fp16.pth")


def _snapshot(module):
    return {k: (v.data_ptr(), v.stride(), v.clone()) for k, v in module.state_dict().items()}


def test_cuda_graphs_and_compile_are_off_by_default():
    required = speed.VDSpeedUp.INPUT_TYPES()["required"]
    assert required["cuda_graphs"][1]["default"] is False and required["compile"][1]["default"] is False


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_input_is_never_changed(device, loaded, monkeypatch):
    """Also when the node believes it runs on a GPU (where it picks its fast paths)."""
    monkeypatch.setattr(pack.nodes.comfy_bridge, "compute_device", lambda: torch.device(device))
    before = _snapshot(loaded.module)
    (fast,) = speed.VDSpeedUp().speed_up(loaded, False, False)
    assert fast is not loaded and fast.module is not loaded.module and fast.managed is loaded.managed  # one owner
    assert fast.module.diffuser is loaded.module and fast.file == loaded.file
    after = _snapshot(loaded.module)
    assert list(after) == list(before)
    for key, (ptr, stride, value) in before.items():
        assert after[key][0] == ptr and after[key][1] == stride, f"{key} was converted in place"
        assert torch.equal(after[key][2], value)
    (again,) = speed.VDSpeedUp().speed_up(fast, False, False)
    assert again.module is not fast.module and again.module.diffuser is loaded.module  # re-wrapped, not stacked


def test_compile_cache_under_comfyui_user_directory(tmp_path, monkeypatch):
    fake = types.ModuleType("folder_paths")
    fake.get_user_directory = lambda: str(tmp_path / "user")
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.setattr(pack.nodes.comfy_bridge, "comfy_available", lambda: True)
    assert speed.compile_cache_dir() == tmp_path / "user" / "versatile_diffusion" / "inductor"


def test_compile_cache_outside_comfyui_is_the_command_line_folder(monkeypatch):
    monkeypatch.setattr(pack.nodes.comfy_bridge, "comfy_available", lambda: False)
    assert speed.compile_cache_dir() == Path("~/.cache/vd_core/inductor").expanduser()


def test_compile_on_a_gpu_uses_that_folder(loaded, tmp_path, monkeypatch):
    calls = []

    def accelerate(diffuser, **options):
        calls.append(options)
        return pack.vd_core.acceleration.AcceleratedDiffuser(
            diffuser, channels_last=False, compiled=None, cuda_graphs=False, max_graphs=1)

    monkeypatch.setattr(pack.nodes.comfy_bridge, "compute_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(speed, "accelerate_diffuser", accelerate)
    monkeypatch.setattr(speed, "compile_cache_dir", lambda: tmp_path / "cache")
    speed.VDSpeedUp().speed_up(loaded, True, True)
    assert calls == [{"channels_last": False, "cuda_graphs": True, "compile": True, "cache_dir": tmp_path / "cache"}]
