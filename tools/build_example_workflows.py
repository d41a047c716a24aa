#!/usr/bin/env python3
"""Make ``example_workflows/`` (what ComfyUI's template browser lists) from ``workflows/``.

``workflows/`` is where the examples are authored (``tools/build_workflows.py``); each file is
copied to ``example_workflows/`` with model metadata added to the nodes that pick a released
file: ``properties.models = [{"name", "url", "directory"}]`` for every widget value that names
one. The frontend's missing-models dialog reads exactly that (frontend 1.27: entries whose
``name`` equals one of the node's widget values, looked up as ``<directory>/<name>`` in the
server's model lists). Thumbnails ``example_workflows/<name>.jpg`` are rendered in the real
frontend by ``tools/check_frontend.py --thumbnails`` and kept here.

    tools/build_example_workflows.py          # rewrite example_workflows/*.json
    tools/build_example_workflows.py --check  # exit 1 when they are not what this would write

Frontend 1.27 lists a missing file with its folder, but offers Download / Copy URL only for
``.safetensors``/``.sft`` names from huggingface.co or civitai.com: the released ``.pth`` files
are listed (name, target folder, URL as the tooltip) with the buttons disabled (seen in the real
frontend). CLIP ViT-L/14 is a folder (``openai/clip-vit-large-patch14``), not one file: the dialog can
neither find an installed folder in the model lists nor download one, so it gets no entry (the
workflows' notes and the VD Loader help page say where it goes).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "workflows"
TARGET = ROOT / "example_workflows"
RELEASE = "https://huggingface.co/shi-labs/versatile-diffusion/resolve/main/pretrained_pth/"
# The released single-file downloads and the model folder the pack looks in first for each.
MODEL_FILES = {
    "vd-four-flow-v1-0-fp16.pth": "versatile_diffusion",
    "optimus-vae.pth": "versatile_diffusion",
    "kl-f8.pth": "versatile_diffusion",
}


def model_entries(node: dict) -> list[dict]:
    """``properties.models`` for one UI-format node: the released files its widgets name."""
    values = node.get("widgets_values")
    values = values.values() if isinstance(values, dict) else values or []
    names = [v for v in values if isinstance(v, str) and v in MODEL_FILES]
    return [{"name": n, "url": RELEASE + n, "directory": MODEL_FILES[n]} for n in dict.fromkeys(names)]


def example_of(workflow: dict) -> dict:
    """The template version of an authored workflow (a new object; ``workflow`` is unchanged)."""
    example = copy.deepcopy(workflow)
    for node in example.get("nodes", []):
        models = model_entries(node)
        if models:
            node.setdefault("properties", {})["models"] = models
        elif "models" in node.get("properties", {}):
            del node["properties"]["models"]
    return example


def render(workflow: dict) -> str:
    return json.dumps(example_of(workflow), indent=1, ensure_ascii=False) + "\n"


def expected_files(source: Path = SOURCE) -> dict[str, str]:
    """File name → text, for every workflow in ``source``."""
    files = sorted(source.glob("*.json"))
    if not files:
        raise SystemExit(f"no workflows in {source}")
    return {f.name: render(json.loads(f.read_text(encoding="utf-8"))) for f in files}


def differences(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    """How ``target`` differs from what :func:`build` writes, one line per file."""
    expected = expected_files(source)
    present = {f.name for f in target.glob("*.json")} if target.is_dir() else set()
    found = [f"{name}: missing" for name in sorted(set(expected) - present)]
    found += [f"{name}: has no source in {source.name}/" for name in sorted(present - set(expected))]
    found += [f"{name}: differs from {source.name}/{name} plus model metadata" for name in sorted(present & set(expected))
              if (target / name).read_text(encoding="utf-8") != expected[name]]
    return found


def build(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    """Write ``target/*.json``; remove JSON files (and their thumbnails) without a source.
    Returns the names written."""
    expected = expected_files(source)
    target.mkdir(exist_ok=True)
    for stale in target.glob("*.json"):
        if stale.name not in expected:
            stale.unlink()
            stale.with_suffix(".jpg").unlink(missing_ok=True)
    for name, text in expected.items():
        (target / name).write_text(text, encoding="utf-8")
    return sorted(expected)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = ap.parse_args()
    if args.check:
        found = differences()
        for line in found:
            print(f"example_workflows/{line}")
        if found:
            print("run tools/build_example_workflows.py to update them", file=sys.stderr)
        return 1 if found else 0
    for name in build():
        print(f"wrote example_workflows/{name}")
    missing = [n for n in expected_files() if not (TARGET / n).with_suffix(".jpg").exists()]
    if missing:
        print(f"no thumbnail yet for {', '.join(missing)}: run tools/check_frontend.py --thumbnails")
    return 0


if __name__ == "__main__":
    sys.exit(main())
