"""pyproject.toml is complete for the Comfy Registry and ComfyUI-Manager.

Rules: the Registry's naming rules (lower case, no "ComfyUI", letters/digits/-/_), and ComfyUI
0.3.64's own reading of the file (comfy_config/config_parser.py): OS and accelerator classifiers,
``[tool.comfy] requires-comfyui``, ``Models`` as ``{location, model_url}``.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = CONFIG["project"], CONFIG["tool"]["comfy"]
REPOSITORY = "https://github.com/versatile-diffusion-comfy/ComfyUI-VersatileDiffusion"
# comfy_config/config_parser.py: any other "Environment ::" classifier empties the accelerator list.
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
RELEASE = "https://huggingface.co/shi-labs/versatile-diffusion/resolve/main/pretrained_pth/"


def test_name_follows_the_registry_rules():
    name = PROJECT["name"]
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,99}", name) and "comfyui" not in name


def test_dependencies_mirror_requirements_txt():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert PROJECT["dependencies"] == [ln for ln in lines if ln and not ln.startswith("#")]


def test_classifiers_give_systems_and_accelerators():
    classifiers = PROJECT["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems and all(s.startswith(OS_PREFIXES) for s in systems)
    assert accelerators and set(accelerators) <= ACCELERATORS


def test_urls_and_icon():
    urls = PROJECT["urls"]
    assert urls["Repository"] == REPOSITORY
    assert urls["Documentation"].startswith(REPOSITORY) and urls["Issues"] == REPOSITORY + "/issues"
    icon = COMFY["Icon"]
    assert icon.startswith(REPOSITORY.replace("github.com", "raw.githubusercontent.com") + "/main/")
    local = ROOT / icon.split("/main/", 1)[1]
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"the Icon URL names {local}, which is not a PNG here"


def test_comfy_section():
    assert COMFY["PublisherId"] and COMFY["DisplayName"] == "Versatile Diffusion"
    assert re.fullmatch(r">=\s*\d+\.\d+\.\d+", COMFY["requires-comfyui"])
    # The web folder is WEB_DIRECTORY's (served under the pack folder, where help pages are looked
    # up); a `web` key here would register it a second time under the project name.
    assert "web" not in COMFY


def test_models_list_every_release_download():
    models = COMFY["Models"]
    assert all(set(m) == {"location", "model_url"} for m in models)
    by_url = {m["model_url"]: m["location"] for m in models}
    for name in ("vd-four-flow-v1-0-fp16.pth", "optimus-vae.pth", "kl-f8.pth"):
        assert by_url.get(RELEASE + name) == f"/versatile_diffusion/{name}"
    assert by_url.get("https://huggingface.co/openai/clip-vit-large-patch14") == "/clip_vision/clip-vit-large-patch14"
