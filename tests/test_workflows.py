"""The example workflows in workflows/ are valid for the pack's nodes and ComfyUI's core nodes.

Each UI-format file (schema 0.4) is checked the way ComfyUI's frontend reads it and the server
validates the prompt it becomes (comfyui_notes.md §8, ComfyUI's execution.validate_inputs): node
types exist, widget values fit their type/range/choices and their count matches the widgets
(plus the extra "control after generate" value after seeds and the "upload" value of image
pickers), links join outputs and inputs of matching types with consistent slot bookkeeping, every
required input is connected, and each graph has an output node. Core node specs are recorded from
ComfyUI 0.3.64 in core_node_specs.json; the pack's come from its INPUT_TYPES, with the model
pickers listing the released file names as a ComfyUI install with the models would.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pack_import import import_pack

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "workflows"
CORE_SPECS = json.loads((Path(__file__).parent / "core_node_specs.json").read_text())["nodes"]
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# The four released downloads, as a user's model folders list them.
MODEL_FOLDERS = {
    "versatile_diffusion": ["optimus-vae.pth", "vd-four-flow-v1-0-fp16.pth"],
    "vae": ["kl-f8.pth"],
}
CLIP_CHOICES = ["clip-vit-large-patch14"]
EXPECTED_WORKFLOWS = {
    "vd_text_to_image", "vd_image_variation", "vd_image_to_text", "vd_text_variation", "vd_dual_context",
    "vd_multi_context_masks", "vd_i2t2i_edit", "vd_ksampler",
}


def _spec_from_class(cls) -> dict:
    types = cls.INPUT_TYPES()
    inputs = {section: {name: (spec[0], spec[1] if len(spec) > 1 else {}) for name, spec in types.get(section, {}).items()}
              for section in ("required", "optional")}
    return {"inputs": inputs, "outputs": list(cls.RETURN_TYPES), "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            "dynamic": {}}


def _spec_from_record(info: dict) -> dict:
    inputs = {section: {name: (info["input"][section][name][0],
                               info["input"][section][name][1] if len(info["input"][section][name]) > 1 else {})
                        for name in info["input_order"].get(section, [])}
              for section in ("required", "optional")}
    return {"inputs": inputs, "outputs": info["output"], "output_node": info["output_node"],
            "dynamic": info.get("dynamic_choices", {})}


@pytest.fixture(scope="module")
def specs():
    pack = import_pack()
    bridge = pack.nodes.comfy_bridge
    patch = pytest.MonkeyPatch()
    patch.setattr(bridge, "list_model_files", lambda folder: list(MODEL_FOLDERS.get(folder, [])))
    patch.setattr(bridge, "list_clip_choices", lambda: list(CLIP_CHOICES))
    try:
        found = {name: _spec_from_class(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    finally:
        patch.undo()
    found.update({name: _spec_from_record(info) for name, info in CORE_SPECS.items()})
    return found


def _ordered_inputs(spec):
    return [(name, typ, opts) for section in ("required", "optional") for name, (typ, opts) in spec["inputs"][section].items()]


def _is_widget(typ, opts) -> bool:
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


def _value_errors(where, name, typ, opts, value, dynamic):
    if isinstance(typ, list):
        if dynamic == "input_image":
            return [] if isinstance(value, str) and value.lower().endswith(IMAGE_EXTENSIONS) else [f"{where}.{name}: {value!r} is not an image file name"]
        return [] if value in typ else [f"{where}.{name}: {value!r} not among {typ[:6]}"]
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool), "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "STRING": lambda v: isinstance(v, str), "BOOLEAN": lambda v: isinstance(v, bool)}
    if not checks[typ](value):
        return [f"{where}.{name}: {value!r} is not a {typ}"]
    errors = []
    if "min" in opts and value < opts["min"]:
        errors.append(f"{where}.{name}: {value} < min {opts['min']}")
    if "max" in opts and value > opts["max"]:
        errors.append(f"{where}.{name}: {value} > max {opts['max']}")
    if typ == "INT" and opts.get("step", 1) > 1 and (value - opts.get("min", 0)) % opts["step"]:
        errors.append(f"{where}.{name}: {value} is off the widget's step {opts['step']}")
    return errors


def _widget_errors(where, node, spec):
    """widgets_values against the spec's widgets, in the frontend's order."""
    values, errors, i = list(node.get("widgets_values") or []), [], 0
    for name, typ, opts in _ordered_inputs(spec):
        if not _is_widget(typ, opts):
            continue
        if i >= len(values):
            return errors + [f"{where}: widget {name!r} has no value ({len(values)} values saved)"]
        errors += _value_errors(where, name, typ, opts, values[i], spec["dynamic"].get(name))
        i += 1
        if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            if i >= len(values) or values[i] not in CONTROL_VALUES:
                errors.append(f"{where}: {name!r} must be followed by a control-after-generate value")
            i += 1
        if opts.get("image_upload"):
            i += 1  # the "upload" button's value
    if i != len(values):
        errors.append(f"{where}: {len(values)} widget values for {i} widget slots")
    return errors


def _compatible(out_type, in_type) -> bool:
    """ComfyUI's link rule: equal types, a '*' wildcard, or overlapping comma unions."""
    if "*" in (out_type, in_type):
        return True
    return bool({t.strip() for t in out_type.split(",")} & {t.strip() for t in in_type.split(",")})


def validate(workflow: dict, specs: dict) -> list[str]:
    """Every problem that would stop the workflow from loading or running, as readable lines."""
    errors = []
    if workflow.get("version") != 0.4:
        errors.append(f"version {workflow.get('version')!r}, expected 0.4")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]) or max(nodes) > workflow["last_node_id"]:
        errors.append("node ids must be unique and ≤ last_node_id")
    links = {link[0]: link for link in workflow["links"]}
    if len(links) != len(workflow["links"]) or (links and max(links) > workflow["last_link_id"]):
        errors.append("link ids must be unique and ≤ last_link_id")
    real = {i: n for i, n in nodes.items() if n["type"] not in VIRTUAL_NODES}
    for nid, node in real.items():
        where = f"node {nid} ({node['type']})"
        spec = specs.get(node["type"])
        if spec is None:
            errors.append(f"{where}: unknown node type")
            continue
        errors += _widget_errors(where, node, spec)
        inputs = dict((name, (typ, opts)) for name, typ, opts in _ordered_inputs(spec))
        connected = set()
        for slot, entry in enumerate(node.get("inputs", [])):
            name = (entry.get("widget") or {}).get("name", entry["name"])
            if name not in inputs:
                errors.append(f"{where}: input {name!r} is not in the node's spec")
                continue
            if entry.get("link") is None:
                continue
            link = links.get(entry["link"])
            if link is None or link[3] != nid or link[4] != slot:
                errors.append(f"{where}: input {name!r} names link {entry['link']}, which does not end here")
                continue
            connected.add(name)
            typ = inputs[name][0]
            if not _compatible(link[5], "COMBO" if isinstance(typ, list) else typ):
                errors.append(f"{where}: input {name!r} ({typ}) is fed a {link[5]}")
        for name, (typ, opts) in inputs.items():
            if name in spec["inputs"]["required"] and not _is_widget(typ, opts) and name not in connected:
                errors.append(f"{where}: required input {name!r} is not connected")
        for slot, output in enumerate(node.get("outputs", [])):
            if slot >= len(spec["outputs"]) or output["type"] != spec["outputs"][slot]:
                errors.append(f"{where}: output {slot} is {output['type']}, the node makes {spec['outputs'][slot:slot + 1]}")
    for lid, (_, src, src_slot, dst, _, typ) in links.items():
        if src not in real or dst not in real or real[src]["type"] not in specs:
            errors.append(f"link {lid}: joins a missing or unknown node")
            continue
        outputs = specs[real[src]["type"]]["outputs"]
        if src_slot >= len(outputs) or outputs[src_slot] != typ:
            errors.append(f"link {lid}: {real[src]['type']} output {src_slot} is not a {typ}")
        elif lid not in real[src]["outputs"][src_slot]["links"]:
            errors.append(f"link {lid}: missing from node {src}'s output list")
        if real[src]["order"] >= real[dst]["order"]:
            errors.append(f"link {lid}: node {src} must come before node {dst} in execution order")
    if not any(specs.get(n["type"], {}).get("output_node") for n in real.values()):
        errors.append("no output node (ComfyUI rejects such a prompt)")
    return errors


def _load(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def test_every_flow_has_a_workflow():
    assert {p.stem for p in WORKFLOW_DIR.glob("*.json")} == EXPECTED_WORKFLOWS


@pytest.mark.parametrize("name", sorted(EXPECTED_WORKFLOWS))
def test_workflow_is_valid(name, specs):
    assert validate(_load(name), specs) == []


@pytest.mark.parametrize("name", sorted(EXPECTED_WORKFLOWS))
def test_workflow_uses_released_file_names(name):
    for node in _load(name)["nodes"]:
        if node["type"] == "VDLoader":
            diffuser, image_model, text_model, optimus, clip, vae, _dtype = node["widgets_values"]
            assert diffuser == "vd-four-flow-v1-0-fp16.pth" and clip == "clip-vit-large-patch14"
            assert (image_model, text_model) != ("none", "none")
            assert optimus in ("optimus-vae.pth", "none") and vae in ("kl-f8.pth", "none")


def _node(workflow, type_):
    return next(n for n in workflow["nodes"] if n["type"] == type_)


def test_validator_reports_broken_workflows(specs):
    """The checks above can fail: each seeded fault is reported."""
    base = _load("vd_text_to_image")
    broken = []

    wf = copy.deepcopy(base)
    _node(wf, "VDTextToImage")["widgets_values"][7] = 516  # width off the step of 8
    broken.append((wf, "step"))
    wf = copy.deepcopy(base)
    _node(wf, "VDTextToImage")["widgets_values"][4] = "heun"  # not a VD sampler
    broken.append((wf, "not among"))
    wf = copy.deepcopy(base)
    del _node(wf, "VDTextToImage")["widgets_values"][1]  # control-after-generate value lost
    broken.append((wf, "control-after-generate"))
    wf = copy.deepcopy(base)
    _node(wf, "VDCLIPTextContext")["inputs"][0]["link"] = None  # clip unplugged
    broken.append((wf, "required input 'clip'"))
    wf = copy.deepcopy(base)
    wf["links"][0][5] = "IMAGE"
    broken.append((wf, "is fed a IMAGE"))
    wf = copy.deepcopy(base)
    _node(wf, "SaveImage")["type"] = "PreviewImageX"
    broken.append((wf, "unknown node type"))
    for workflow, expected in broken:
        assert any(expected in e for e in validate(workflow, specs)), expected


def test_core_specs_cover_every_core_node_used():
    used = {n["type"] for name in EXPECTED_WORKFLOWS for n in _load(name)["nodes"]}
    core = {t for t in used if not t.startswith("VD") and t not in VIRTUAL_NODES}
    assert core <= set(CORE_SPECS), core - set(CORE_SPECS)
