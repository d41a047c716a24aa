"""example_workflows/ (ComfyUI's template folder) is workflows/ plus model metadata, with a
thumbnail per workflow; tools/build_example_workflows.py makes it in one command.

The released files and their download addresses are written out here (the Versatile Diffusion
release on Hugging Face), not taken from the script: the frontend's missing-models dialog reads
``properties.models`` entries ``{name, url, directory}`` whose ``name`` is one of the node's
widget values (frontend 1.27, ``getSelectedModelsMetadata``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "https://huggingface.co/shi-labs/versatile-diffusion/resolve/main/pretrained_pth/"
RELEASED_FILES = {"vd-four-flow-v1-0-fp16.pth", "optimus-vae.pth", "kl-f8.pth"}
MODEL_KEYS = {"name", "url", "directory"}


def _tool():
    spec = importlib.util.spec_from_file_location("build_example_workflows", ROOT / "tools" / "build_example_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCES = sorted((ROOT / "workflows").glob("*.json"))


def test_example_workflows_are_the_workflows_with_metadata():
    """The committed folder is what the script writes from workflows/ (else: run it)."""
    assert _tool().differences() == [], "run tools/build_example_workflows.py"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_every_released_file_a_node_picks_has_its_download(source):
    authored = json.loads(source.read_text())
    example = json.loads((ROOT / "example_workflows" / source.name).read_text())
    assert [n["id"] for n in example["nodes"]] == [n["id"] for n in authored["nodes"]]
    named = 0
    for node, original in zip(example["nodes"], authored["nodes"]):
        models = node.get("properties", {}).get("models", [])
        values = [v for v in node.get("widgets_values") or [] if isinstance(v, str)]
        released = [v for v in values if v in RELEASED_FILES]
        assert sorted(m["name"] for m in models) == sorted(set(released)), f"node {node['id']} ({node['type']})"
        for m in models:
            assert set(m) == MODEL_KEYS and m["url"] == RELEASE + m["name"] and m["directory"] == "versatile_diffusion"
        # nothing else of the node changes
        rest = {k: v for k, v in node.get("properties", {}).items() if k != "models"}
        assert {**node, "properties": rest} == {**original, "properties": original.get("properties", {})}
        named += len(released)
    assert named, f"{source.name}: no node picks a released file, so nothing could be downloaded"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_each_template_has_a_jpeg_thumbnail(source):
    thumbnail = ROOT / "example_workflows" / f"{source.stem}.jpg"
    assert thumbnail.is_file(), f"no {thumbnail.name}: run tools/check_frontend.py --thumbnails"
    data = thumbnail.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) > 5000, f"{thumbnail.name} is not a real JPEG picture"


def test_building_follows_whatever_workflows_holds(tmp_path):
    """Regenerating is one call on any set of workflows: a new or changed workflow is reported
    and written, one without a source is removed with its thumbnail, and a rebuild agrees."""
    tool = _tool()
    source, target = tmp_path / "workflows", tmp_path / "example_workflows"
    shutil.copytree(ROOT / "workflows", source)
    tool.build(source, target)
    assert tool.differences(source, target) == []
    first = sorted(source.glob("*.json"))[0]
    workflow = json.loads(first.read_text())
    workflow["nodes"][0]["widgets_values"] = ["optimus-vae.pth", "somebody-else.safetensors"]
    first.write_text(json.dumps(workflow))
    (target / "orphan.json").write_text("{}")
    (target / "orphan.jpg").write_bytes(b"\xff\xd8\xff")
    assert tool.differences(source, target) == [
        "orphan.json: has no source in workflows/",
        f"{first.name}: differs from workflows/{first.name} plus model metadata",
    ]
    tool.build(source, target)
    assert tool.differences(source, target) == [] and not (target / "orphan.jpg").exists()
    rebuilt = json.loads((target / first.name).read_text())
    assert rebuilt["nodes"][0]["properties"]["models"] == [
        {"name": "optimus-vae.pth", "url": RELEASE + "optimus-vae.pth", "directory": "versatile_diffusion"}]
    assert json.loads(first.read_text()) == workflow  # the authored file is left as it was
