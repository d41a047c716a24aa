#!/usr/bin/env python3
"""Open every example workflow in the real ComfyUI frontend (headless Chromium) and check it.

For each ``example_workflows/*.json`` (default) the frontend loads the file as a user's
"Open" would, and the check asserts:

* no node is missing or red (``has_errors``: an unknown type, or a node the server rejected);
* no missing-models dialog opened (the models folder holds every file the workflow names);
* every widget kept the value the file gives (``widgets_values`` as the frontend saves them
  again), every combo value is one of its choices and every number lies in its range;
* every help page (``web/docs/<NodeId>.md``) is served where the help panel looks for it;
* the prompt the frontend would queue (``app.graphToPrompt``) validates against the live
  ``/object_info``: known node types, every required input given, combo values among the
  choices, numbers in range, links between matching types.

Then it runs the image→text example (the smallest graph with ``VDImageToText`` and
``VDOptimusTextDecode``; ``--run-steps`` caps its ``steps`` widgets) from the frontend's Queue
button path (``app.queuePrompt``) and requires the decode node to show the caption the server
returned. Screenshots (one per workflow, plus the run) go to ``--out``; ``--thumbnails`` also
writes ``example_workflows/<name>.jpg`` from them (the template browser's thumbnails).

    tools/check_frontend.py [--out DIR] [--thumbnails] [--run-steps N] [workflow.json ...]

Needs Debian's ``chromium`` and ``chromium-driver``, a ComfyUI work tree (``--comfy`` /
``$COMFYUI_DIR`` [/tmp/ComfyUI]) and its python (``--python`` / ``$COMFY_PYTHON``
[/tmp/venv-comfy/bin/python]); models: the tiny reference release (``$VD_REFERENCE_DIR``).
Exit status 0 when every check holds, 1 with the failures listed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontend_session import PACK, Browser, ComfyProcess, FrontendError, tiny_models

TEXT_WIDGET = "vd_text"  # added by web/js/vd_text_on_node.js
RUN_TYPES = ("VDImageToText", "VDOptimusTextDecode")
THUMBNAIL_SIZE = (640, 480)

LOAD_AND_INSPECT = r"""
const [wf, name] = args;
await window.app.loadGraphData(wf, true, true, name);
await new Promise(r => setTimeout(r, 800));
const nodes = window.app.graph._nodes.map(n => ({
  id: n.id, type: n.type, has_errors: !!n.has_errors,
  saved: n.serialize().widgets_values || [],
  widgets: (n.widgets || []).map(w => ({
    name: w.name, type: w.type, value: w.value,
    choices: Array.isArray(w.options?.values) ? w.options.values : null,
    min: w.options?.min ?? null, max: w.options?.max ?? null})),
}));
const prompt = (await window.app.graphToPrompt()).output;
const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300));
return {nodes, prompt, dialogs, missingModels: !!document.querySelector('.comfy-missing-models')};
"""

FIT_VIEW = r"""
const app = window.app, ds = app.canvas.ds;
document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of app.graph._nodes) {
  const b = n.getBounding();
  x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
  x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
}
const r = app.canvas.canvas.getBoundingClientRect();
const left = 60 - r.left, top = 95 - r.top, right = window.innerWidth - 20 - r.left, bottom = window.innerHeight - 20 - r.top;
const scale = Math.min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), 1);
ds.scale = scale;
ds.offset[0] = (left + right) / 2 / scale - (x0 + x1) / 2;
ds.offset[1] = (top + bottom) / 2 / scale - (y0 + y1) / 2;
app.canvas.setDirty(true, true);
await new Promise(r => setTimeout(r, 700));
return scale;
"""

RUN = r"""
const [maxSteps] = args;
for (const n of window.app.graph._nodes)
  for (const w of n.widgets || [])
    if (w.name === 'steps' && typeof w.value === 'number' && w.value > maxSteps) w.value = maxSteps;
window.__vdRun = null;
const api = window.app.api;
api.addEventListener('execution_success', () => { window.__vdRun = {status: 'ok'}; });
api.addEventListener('execution_error', e => { window.__vdRun = {status: 'error', detail: JSON.stringify(e.detail).slice(0, 1500)}; });
await window.app.queuePrompt(0);
return true;
"""

HELP_STATUS = r"""
const [folder, names] = args;
const status = {};
for (const name of names) {
  // the frontend's NodeHelpService: /extensions/<pack folder>/docs/<NodeId>.md (after <NodeId>/<locale>.md)
  const r = await fetch(window.app.api.fileURL(`/extensions/${folder}/docs/${name}.md`));
  status[name] = r.status;
}
return status;
"""

READ_TEXT = r"""
const [type, widgetName] = args;
return window.app.graph._nodes.filter(n => n.type === type).map(n => {
  const w = (n.widgets || []).find(w => w.name === widgetName);
  const box = w && w.element ? w.element.getBoundingClientRect() : null;
  return {id: n.id, text: w ? String(w.value) : null, shown: !!(box && box.width > 0 && box.height > 0),
          lastNodeErrors: window.app.lastNodeErrors || null};
});
"""


def _types_match(out_type: str, in_type) -> bool:
    if not isinstance(in_type, str) or out_type == "*" or in_type == "*":
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def prompt_problems(prompt: dict, object_info: dict) -> list[str]:
    """What ComfyUI's ``validate_inputs`` would refuse in the frontend's prompt (combo choices,
    number ranges, required inputs, link types), one line each."""
    problems = []
    for node_id, node in prompt.items():
        cls = node.get("class_type")
        info = object_info.get(cls)
        if info is None:
            problems.append(f"node {node_id}: type {cls or '(none: the frontend lacks it)'} is not known to the server")
            continue
        inputs = node.get("inputs", {})
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                typ, opts = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if name not in inputs:
                    if section == "required":
                        problems.append(f"node {node_id} ({cls}): required input {name} is missing")
                    continue
                value = inputs[name]
                where = f"node {node_id} ({cls}) input {name}"
                if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                    origin = prompt.get(str(value[0]))
                    if origin is None:
                        problems.append(f"{where}: linked to node {value[0]}, which is not in the prompt")
                        continue
                    out_types = object_info.get(origin["class_type"], {}).get("output", [])
                    if value[1] >= len(out_types) or not _types_match(out_types[value[1]], typ):
                        problems.append(f"{where}: link from a {origin['class_type']} output that does not fit {typ}")
                elif isinstance(typ, list) or typ == "COMBO":
                    choices = typ if isinstance(typ, list) else opts.get("options", [])
                    if value not in choices:
                        problems.append(f"{where}: {value!r} is not one of its {len(choices)} choices")
                elif typ in ("INT", "FLOAT"):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        problems.append(f"{where}: {value!r} is not a number")
                    elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                        problems.append(f"{where}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
                elif typ == "BOOLEAN" and not isinstance(value, bool):
                    problems.append(f"{where}: {value!r} is not a boolean")
    return problems


def widget_problems(report: dict, workflow: dict) -> list[str]:
    """Red or missing nodes, and widgets whose value the frontend changed or cannot hold."""
    problems = []
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in report["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["has_errors"]:
            problems.append(f"{where} is red: its type is missing or it has errors")
        given = by_id.get(node["id"], {}).get("widgets_values")
        if isinstance(given, list) and node["saved"] != given:
            problems.append(f"{where}: the frontend holds widget values {node['saved']} instead of {given}")
        for w in node["widgets"]:
            value = w["value"]
            if w["choices"] is not None and w["choices"] and value not in w["choices"] and w["type"] == "combo":
                problems.append(f"{where} widget {w['name']}: {value!r} is not among its choices")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (w["min"] is not None and value < w["min"]) or (w["max"] is not None and value > w["max"]):
                    problems.append(f"{where} widget {w['name']}: {value} outside [{w['min']}, {w['max']}]")
    if report["missingModels"]:
        problems.append("the missing-models dialog opened: " + " | ".join(report["dialogs"]))
    return problems


def help_page_problems(browser: Browser, object_info: dict) -> list[str]:
    """Each page in web/docs is served where the frontend's help panel fetches it, for a node of this pack."""
    pages = sorted(p.stem for p in (PACK / "web" / "docs").glob("*.md"))
    ours = {k for k, v in object_info.items() if str(v.get("python_module", "")).split(".")[:2] == ["custom_nodes", PACK.name]}
    status = browser.js_async(HELP_STATUS, PACK.name, pages)
    problems = [f"help page {name}.md: HTTP {code} at /extensions/{PACK.name}/docs/" for name, code in status.items() if code != 200]
    problems += [f"help page {name}.md: no node {name} of this pack in /object_info" for name in pages if name not in ours]
    return problems + ([] if pages else ["no help pages in web/docs"])


def save_screenshot(browser: Browser, path: Path, thumbnail: Path | None = None) -> None:
    browser.js_async(FIT_VIEW)
    png = browser.screenshot_png()
    path.write_bytes(png)
    if thumbnail is not None:
        from PIL import Image

        image = Image.open(io.BytesIO(png)).convert("RGB")
        width, height = image.size
        image = image.crop((50, 85, width - 10, height - 10))  # the canvas without menus and tabs
        image.thumbnail(THUMBNAIL_SIZE)
        image.save(thumbnail, "JPEG", quality=85)


def check(workflows: list[Path], out: Path, comfy: Path, python: str, reference: Path, chromium: str,
          chromedriver: str, thumbnails: bool = False, run_steps: int = 10, log=print) -> list[str]:
    """Every failure found, one line each (empty: all checks hold). Screenshots go to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vd_frontend_"))
    failures: list[str] = []
    try:
        models = tiny_models(reference, work / "models")
        with ComfyProcess(comfy, python, models, work, input_files=sorted((comfy / "input").glob("*.*"))) as server, \
                Browser(chromium, chromedriver, work) as browser:
            object_info = server.get("/object_info")
            browser.open(server.url)
            browser.wait_for("window.app && window.app.graph && window.app.canvas && window.app.api", 180,
                             "the ComfyUI frontend")
            time.sleep(2)
            extensions = server.get("/extensions")
            if not any(e.endswith("/vd_text_on_node.js") for e in extensions):
                failures.append("the text-on-node extension is not served (/extensions lists "
                                f"{len(extensions)} scripts, none vd_text_on_node.js)")
            failures += help_page_problems(browser, object_info)
            candidates = []
            for path in workflows:
                workflow = json.loads(path.read_text())
                name = path.stem
                report = browser.js_async(LOAD_AND_INSPECT, workflow, path.name)
                found = widget_problems(report, workflow) + prompt_problems(report["prompt"], object_info)
                failures += [f"{path.name}: {p}" for p in found]
                save_screenshot(browser, out / f"{name}.png", path.with_suffix(".jpg") if thumbnails else None)
                log(f"{path.name}: {len(report['nodes'])} nodes, {len(found)} problems")
                types = {n["type"] for n in workflow["nodes"]}
                if all(t in types for t in RUN_TYPES):
                    candidates.append((len(workflow["nodes"]), path))
            run_target = min(candidates)[1] if candidates else None  # the smallest graph runs fastest
            if run_target is None:
                failures.append(f"no example workflow has both {' and '.join(RUN_TYPES)} to run")
            else:
                failures += run_image_to_text(browser, server, run_target, out, run_steps, log)
    except FrontendError as exc:
        failures.append(str(exc))
    finally:
        for name in ("comfy_server.log", "chromedriver.log"):
            if (work / name).exists():
                shutil.copy(work / name, out / name)
        shutil.rmtree(work, ignore_errors=True)
    return failures


def run_image_to_text(browser: Browser, server: ComfyProcess, path: Path, out: Path, run_steps: int, log) -> list[str]:
    browser.js_async(LOAD_AND_INSPECT, json.loads(path.read_text()), path.name)
    browser.js_async(RUN, run_steps)
    t0 = time.monotonic()
    result = browser.wait_for("window.__vdRun", 900, f"{path.name} to finish")
    log(f"{path.name}: run {result['status']} after {time.monotonic() - t0:.1f} s")
    if result["status"] != "ok":
        return [f"{path.name}: the run failed: {result.get('detail')}"]
    time.sleep(1)
    history = server.get("/history?max_items=1")
    outputs = next(iter(history.values()))["outputs"] if history else {}
    failures = []
    shown = browser.js(READ_TEXT, RUN_TYPES[1], TEXT_WIDGET)
    for node in shown:
        expected = "\n".join(outputs.get(str(node["id"]), {}).get("text", []))
        if not expected.strip():
            failures.append(f"{path.name}: the server returned no text for decode node {node['id']}")
        elif node["text"] != expected or not node["shown"]:
            failures.append(f"{path.name}: decode node {node['id']} shows {node['text']!r} "
                            f"(visible: {node['shown']}), the server returned {expected!r}")
        else:
            log(f"{path.name}: decode node {node['id']} shows {expected!r}")
    if not shown:
        failures.append(f"{path.name}: no {RUN_TYPES[1]} node in the graph after the run")
    save_screenshot(browser, out / f"{path.stem}_after_run.png")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflows", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "vd_frontend_check")
    ap.add_argument("--thumbnails", action="store_true", help="write example_workflows/<name>.jpg")
    ap.add_argument("--run-steps", type=int, default=10, help="cap on the steps of the image-to-text run")
    ap.add_argument("--comfy", type=Path, default=Path(os.environ.get("COMFYUI_DIR", "/tmp/ComfyUI")))
    ap.add_argument("--python", default=os.environ.get("COMFY_PYTHON", "/tmp/venv-comfy/bin/python"))
    ap.add_argument("--reference", type=Path,
                    default=Path(os.environ.get("VD_REFERENCE_DIR", PACK.parent / "shared" / "vd_reference")))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = ap.parse_args()
    workflows = args.workflows or sorted((PACK / "example_workflows").glob("*.json"))
    failures = check(workflows, args.out, args.comfy, args.python, args.reference, args.chromium,
                     args.chromedriver, args.thumbnails, args.run_steps)
    for f in failures:
        print("FAIL:", f)
    print(f"screenshots in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
