"""Every node's inputs (names, order, types, defaults, min/max/step, choices) against the committed
snapshot ``tests/node_inputs_snapshot.json``: ComfyUI saves widget values by position, so a change
here changes what users' saved workflows load and must be a deliberate, reviewed one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "snapshot_node_inputs.py"
SNAPSHOT = ROOT / "tests" / "node_inputs_snapshot.json"
REGENERATE = f"{Path(sys.executable).name} tools/snapshot_node_inputs.py"


def describe_changes(old: dict, new: dict) -> list[str]:
    """Readable differences between two snapshots, node by node and input by input."""
    lines = [f"node {n} added" for n in new if n not in old] + [f"node {n} removed" for n in old if n not in new]
    for node in (n for n in new if n in old):
        for section in dict.fromkeys([*old[node], *new[node]]):
            before, after = old[node].get(section, []), new[node].get(section, [])
            if [i[0] for i in before] != [i[0] for i in after]:
                lines.append(f"{node}.{section}: inputs {[i[0] for i in before]} -> {[i[0] for i in after]}")
            lines += [f"{node}.{section}.{b[0]}: {b[1:]} -> {a[1:]}" for b, a in zip(before, after)
                      if b[0] == a[0] and b != a]
    return lines


def test_node_inputs_match_the_snapshot():
    # A fresh interpreter: the pack imported without ComfyUI, whatever this test session imported.
    result = subprocess.run([sys.executable, str(TOOL), "--print"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    current = json.loads(result.stdout)
    committed = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    changes = describe_changes(committed, current)
    assert current == committed, (
        "node inputs differ from tests/node_inputs_snapshot.json (saved workflows load widget values by "
        "position):\n  " + "\n  ".join(changes or ["(order of keys or options)"])
        + f"\nIf the change is deliberate, regenerate the snapshot with `{REGENERATE}` and commit it."
    )


def test_describe_changes_names_what_moved():
    old = {"A": {"required": [["x", "INT", {"default": 1}], ["y", "FLOAT", {}]]}}
    new = {"A": {"required": [["y", "FLOAT", {}], ["x", "INT", {"default": 1}]]},
           "B": {"required": []}}
    assert describe_changes(old, new) == ["node B added", "A.required: inputs ['x', 'y'] -> ['y', 'x']"]
    new = {"A": {"required": [["x", "INT", {"default": 2}], ["y", "FLOAT", {}]]}}
    assert describe_changes(old, new) == ["A.required.x: ['INT', {'default': 1}] -> ['INT', {'default': 2}]"]
