"""A saved ComfyUI workflow (UI format, schema version 0.4) built from node names and links.

Slot indices, widget order (with the extra "control after generate" value after a seed and the
"upload" value of an image picker), link ids, execution order and a simple left-to-right layout are
derived from node specs: the pack's classes and the recorded core specs in
``tests/core_node_specs.json`` (rules: /work/shared/comfyui_notes.md §8).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack_import import import_pack  # noqa: E402  (the pack's nodes must be imported as a package)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NOTE = "MarkdownNote"
COLUMN_WIDTH, ROW_GAP, NODE_WIDTH = 380, 40, 330


@dataclass
class Spec:
    """A node type's sockets and widgets, in the frontend's order."""

    inputs: list[tuple[str, object, dict]]  # (name, type, options), required then optional
    outputs: list[tuple[str, str]]  # (name, type)

    def is_widget(self, name: str) -> bool:
        typ, opts = self.input(name)
        return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")

    def input(self, name: str) -> tuple[object, dict]:
        for n, typ, opts in self.inputs:
            if n == name:
                return typ, opts
        raise KeyError(name)


def pack_spec(cls) -> Spec:
    types = cls.INPUT_TYPES()
    inputs = [(name, spec[0], spec[1] if len(spec) > 1 else {})
              for section in ("required", "optional") for name, spec in types.get(section, {}).items()]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return Spec(inputs, list(zip(names, cls.RETURN_TYPES)))


def core_spec(info: dict) -> Spec:
    inputs = [(name, info["input"][section][name][0],
               info["input"][section][name][1] if len(info["input"][section][name]) > 1 else {})
              for section, names in info["input_order"].items() for name in names]
    return Spec(inputs, list(zip(info["output_name"], info["output"])))


def load_specs() -> dict[str, Spec]:
    pack = import_pack()
    specs = {name: pack_spec(cls) for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    core = json.loads((ROOT / "tests" / "core_node_specs.json").read_text())["nodes"]
    specs.update({name: core_spec(info) for name, info in core.items()})
    return specs


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    title: str | None
    links_in: dict = field(default_factory=dict)  # input name -> link id
    links_out: dict = field(default_factory=dict)  # output name -> [link ids]


class Workflow:
    """A graph under construction; :meth:`to_ui` gives the saved-workflow JSON."""

    def __init__(self, name: str, specs: dict[str, Spec]):
        self.name, self.specs = name, specs
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.notes: list[str] = []

    def add(self, type_: str, title: str | None = None, **widgets) -> int:
        spec = self.specs[type_]
        for name in widgets:
            if not spec.is_widget(name):
                raise ValueError(f"{self.name}: {type_} has no widget {name!r}")
        self.nodes.append(Node(len(self.nodes) + 1, type_, widgets, title))
        return len(self.nodes)

    def link(self, src: int, output: str, dst: int, input_: str) -> None:
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        out_names = [n for n, _ in self.specs[source.type].outputs]
        self.specs[target.type].input(input_)  # raises for an unknown input
        link_id = len(self.links) + 1
        slot = out_names.index(output)
        self.links.append([link_id, src, slot, dst, None, self.specs[source.type].outputs[slot][1]])
        target.links_in[input_] = link_id
        source.links_out.setdefault(output, []).append(link_id)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def _widget_values(self, node: Node) -> list:
        spec, values = self.specs[node.type], []
        for name, typ, opts in spec.inputs:
            if not spec.is_widget(name):
                continue
            default = opts.get("default", typ[0] if isinstance(typ, list) and typ else None)
            values.append(node.widgets.get(name, default))
            if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                values.append("fixed")  # the frontend's extra "control after generate" widget
            if opts.get("image_upload"):
                values.append("image")  # the frontend's extra "upload" widget
        return values

    def _inputs(self, node: Node) -> list[dict]:
        spec, entries = self.specs[node.type], []
        sockets = [(n, t) for n, t, _ in spec.inputs if not spec.is_widget(n)]
        linked_widgets = [(n, t) for n, t, _ in spec.inputs if spec.is_widget(n) and n in node.links_in]
        for name, typ in sockets + linked_widgets:
            entry = {"name": name, "type": "COMBO" if isinstance(typ, list) else typ, "link": node.links_in.get(name)}
            if spec.is_widget(name):
                entry["widget"] = {"name": name}
            link_id = node.links_in.get(name)
            if link_id is not None:
                self.links[link_id - 1][4] = len(entries)
            entries.append(entry)
        return entries

    def _depths(self) -> dict[int, int]:
        """Longest path from a source node: the column of each node and a valid execution order."""
        depth = {n.id: 0 for n in self.nodes}
        for _ in self.nodes:
            for _, src, _, dst, _, _ in self.links:
                depth[dst] = max(depth[dst], depth[src] + 1)
        return depth

    def to_ui(self) -> dict:
        depth = self._depths()
        order = sorted(self.nodes, key=lambda n: (depth[n.id], n.id))
        rows: dict[int, float] = {}
        out_nodes = []
        for index, node in enumerate(order):
            spec = self.specs[node.type]
            inputs = self._inputs(node)
            widgets = self._widget_values(node)
            height = 46 + 22 * max(len(inputs), len(spec.outputs)) + 26 * len(widgets)
            height += sum(60 for v in widgets if isinstance(v, str) and ("\n" in v or len(v) > 40))
            column = depth[node.id]
            y = rows.get(column, 80.0)
            rows[column] = y + height + ROW_GAP
            entry = {
                "id": node.id, "type": node.type, "pos": [40 + COLUMN_WIDTH * column, y],
                "size": [NODE_WIDTH, height], "flags": {}, "order": index, "mode": 0,
                "inputs": inputs,
                "outputs": [{"name": name, "type": typ, "links": node.links_out.get(name, []), "slot_index": slot}
                            for slot, (name, typ) in enumerate(spec.outputs)],
                "properties": {"Node name for S&R": node.type},
                "widgets_values": widgets,
            }
            if node.title:
                entry["title"] = node.title
            out_nodes.append(entry)
        next_id = len(self.nodes) + 1
        for i, text in enumerate(self.notes):
            out_nodes.append({
                "id": next_id + i, "type": NOTE, "pos": [40, -260 - 200 * i], "size": [760, 180], "flags": {},
                "order": len(order) + i, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text],
            })
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-versatile-diffusion/{self.name}")),
            "revision": 0,
            "last_node_id": next_id + len(self.notes) - 1,
            "last_link_id": len(self.links),
            "nodes": out_nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }
