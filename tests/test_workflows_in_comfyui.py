"""Every example workflow, end to end in real, headless ComfyUI, on the miniature release files.

Runs when ``VD_COMFYUI_DIR`` (a ComfyUI work tree) and ``VD_COMFY_PYTHON`` (its venv's Python)
are set (``tests/comfy_runtime.py``; skipped otherwise, failed under ``CI=true``). Uses the shared
harness (``$VD_COMFY_HARNESS``, default ``../shared/comfy_harness``): ``check_workflows.py``
validates every JSON in ``workflows/`` and ``example_workflows/`` against the live
``/object_info``, then ``run_workflow.py`` runs each one in its own server. The model folder is
built from symlinks to ``$VD_REFERENCE_DIR/tiny_release`` the way a user lays out
``ComfyUI/models`` (README "Model files"). The graphs run as saved except for their sizes
(``QUICK``: few steps, small images, one item; the input image is shrunk to that size too), so
that all of them take minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_runtime import ROOT, unavailable
from conftest import reference_dir

WORKFLOWS = sorted(p for folder in ("workflows", "example_workflows") for p in (ROOT / folder).glob("*.json"))
# Widget values lowered to these bounds (never below the node's own minimum).
QUICK = {"steps": 4, "width": 64, "height": 64, "batch_size": 1, "count": 1, "max_tokens": 8}
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny"}
TIMEOUT_S = int(os.environ.get("VD_WORKFLOW_TIMEOUT", "900"))


def harness_dir() -> Path:
    return Path(os.environ.get("VD_COMFY_HARNESS", ROOT.parent / "shared" / "comfy_harness")).resolve()


def link_models(release: Path, models: Path) -> Path:
    """``models/`` as a user has it: the diffuser, Optimus and its tokenizers in
    ``versatile_diffusion/``, kl-f8 in ``vae/``, the CLIP folder in ``clip_vision/``."""
    layout = {
        "versatile_diffusion": ["vd-four-flow-v1-0-fp16.pth", "optimus-vae.pth", "optimus_tokenizers"],
        "vae": ["kl-f8.pth"],
        "clip_vision": ["clip-vit-large-patch14"],
    }
    for folder, names in layout.items():
        (models / folder).mkdir(parents=True)
        for name in names:
            (models / folder / name).symlink_to(release / name)
    return models


def quick_prompt(workflow: dict, object_info: dict) -> dict:
    """The workflow in API format with its size widgets lowered to ``QUICK``."""
    sys.path.insert(0, str(harness_dir()))
    try:
        from comfy_common import ui_to_api, workflow_format
    finally:
        sys.path.remove(str(harness_dir()))
    prompt = ui_to_api(workflow, object_info)[0] if workflow_format(workflow) == "ui" else workflow
    for node in prompt.values():
        spec = object_info[node["class_type"]]["input"]
        specs = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, bound in QUICK.items():
            value = node["inputs"].get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                options = specs[name][1] if len(specs.get(name, ())) > 1 else {}
                node["inputs"][name] = max(min(value, bound), options.get("min", bound))
    return prompt


def _run(argv: list[str], python: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMFY_PYTHON": str(python)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S + 300, check=False)


@pytest.fixture(scope="session")
def comfy_setup(comfy_python, tmp_path_factory):
    """Models, input images and the live ``/object_info`` (from ``check_workflows.py``, whose
    result the validation test asserts)."""
    comfy_dir, python = comfy_python
    harness = harness_dir()
    if not (harness / "run_workflow.py").is_file():
        unavailable(f"the workflow harness is not at {harness} (set VD_COMFY_HARNESS)")
    release = reference_dir() / "tiny_release"
    if not (release / "vd-four-flow-v1-0-fp16.pth").is_file():
        unavailable(f"the miniature release files are not at {release} (set VD_REFERENCE_DIR)")
    work = tmp_path_factory.mktemp("comfy_workflows")
    models = link_models(release, work / "models")
    (work / "input").mkdir()
    # The image the workflows load, as ComfyUI ships it, at the QUICK size (an image input sets the
    # size of the image-to-image flows).
    with Image.open(comfy_dir / "input" / "example.png") as example:
        example.convert("RGB").resize((QUICK["width"], QUICK["height"]), Image.LANCZOS).save(work / "input" / "example.png")
    object_info = work / "object_info.json"
    check = _run([str(harness / "check_workflows.py"), "--comfy", str(comfy_dir), "--pack", str(ROOT),
                  "--models", str(models), "--allow-input-mismatch", "--save-object-info", str(object_info)],
                 python)
    return {"comfy": comfy_dir, "python": python, "harness": harness, "models": models, "input": work / "input",
            "check": check, "object_info": json.loads(object_info.read_text()) if object_info.is_file() else None}


def test_there_are_workflows():
    assert WORKFLOWS, "no JSON in workflows/ or example_workflows/"


def test_workflows_validate_against_the_live_node_specs(comfy_setup):
    check = comfy_setup["check"]
    assert check.returncode == 0, f"check_workflows.py exit {check.returncode}:\n{check.stdout[-6000:]}{check.stderr[-3000:]}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[str(p.relative_to(ROOT)) for p in WORKFLOWS])
def test_workflow_runs_end_to_end(comfy_setup, path, tmp_path):
    if comfy_setup["object_info"] is None:
        pytest.fail(f"no /object_info from ComfyUI:\n{comfy_setup['check'].stdout[-3000:]}{comfy_setup['check'].stderr[-3000:]}")
    prompt = quick_prompt(json.loads(path.read_text()), comfy_setup["object_info"])
    (tmp_path / path.name).write_text(json.dumps(prompt))
    out = tmp_path / "out"
    done = _run([str(comfy_setup["harness"] / "run_workflow.py"), "--comfy", str(comfy_setup["comfy"]),
                 "--pack", str(ROOT), "--models", str(comfy_setup["models"]), "--input", str(comfy_setup["input"]),
                 "--workflow", str(tmp_path / path.name), "--out", str(out), "--timeout", str(TIMEOUT_S),
                 "--comfy-arg=--preview-method", "--comfy-arg=latent2rgb"], comfy_setup["python"])
    log = (out / "server.log").read_text(errors="replace")[-4000:] if (out / "server.log").is_file() else ""
    assert done.returncode == 0, f"{path.name}: {done.stdout[-3000:]}{done.stderr[-2000:]}\n--- server.log\n{log}"
    result = json.loads((out / "result.json").read_text())
    assert result.get("ok") and result["status"]["status_str"] == "success", result.get("status")
    outputs = result["outputs"]
    for node_id, node in prompt.items():
        if node["class_type"] not in OUTPUT_NODES:
            continue
        images = [out / name for name in outputs["images"] if name.startswith(f"node{node_id}_")]
        texts = outputs["text"].get(node_id, [])
        assert images or any(t.strip() for t in texts), f"{path.name}: {node['class_type']} {node_id} gave no output"
        for image in images:  # an image of one colour (NaN → black, a broken decode) is not a result
            pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
            assert pixels.std() > 1.0, f"{path.name}: {image.name} is flat (std {pixels.std():.3f})"
