"""Write (or print) the snapshot of every node's ``INPUT_TYPES`` that ``tests/test_node_inputs_snapshot.py`` pins.

ComfyUI stores a node's widget values in a saved workflow by position, so renaming, reordering,
adding or retyping an input, or changing a default, shifts or changes what users' workflows load.
The snapshot makes every such change visible in review. After a deliberate change, regenerate it:

    python tools/snapshot_node_inputs.py            # rewrites tests/node_inputs_snapshot.json
    python tools/snapshot_node_inputs.py --print    # prints it instead

Runs without ComfyUI: the pack is imported the way ``tests/pack_import.py`` does, with ComfyUI's
``folder_paths`` blocked so that model-file combos are the same on every machine (``["none"]``).
Tooltips are left out (wording is not a workflow's concern); everything else of an input is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "node_inputs_snapshot.json"
LEFT_OUT = ("tooltip",)


def input_spec(spec) -> list:
    """``(type_or_choices, options)`` → ``[type_or_choices, options without tooltips]``."""
    if isinstance(spec, str):  # hidden inputs are bare type names
        return [spec, {}]
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return [list(kind) if isinstance(kind, (list, tuple)) else kind,
            {key: options[key] for key in sorted(options) if key not in LEFT_OUT}]


def snapshot() -> dict:
    """Node id → section (``required``/``optional``/``hidden``) → ``[[name, type, options], ...]`` in order."""
    sys.modules.setdefault("folder_paths", None)  # None in sys.modules: "import folder_paths" fails
    sys.path.insert(0, str(ROOT / "tests"))
    from pack_import import import_pack

    pack = import_pack()
    nodes = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        sections = cls.INPUT_TYPES()
        nodes[node_id] = {section: [[name, *input_spec(spec)] for name, spec in inputs.items()]
                          for section, inputs in sections.items()}
    return nodes


def dumps(nodes: dict) -> str:
    """JSON with one line per input, so that a review diff shows exactly the inputs that changed."""
    def line(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    blocks = []
    for node_id, sections in nodes.items():
        parts = [f'  {line(section)}: [\n' + ",\n".join(f"   {line(i)}" for i in inputs) + "\n  ]"
                 if inputs else f"  {line(section)}: []" for section, inputs in sections.items()]
        blocks.append(f" {line(node_id)}: {{\n" + ",\n".join(parts) + "\n }")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the snapshot instead of writing it")
    args = parser.parse_args(argv)
    text = dumps(snapshot())
    if args.print:
        sys.stdout.write(text)
    else:
        SNAPSHOT.write_text(text, encoding="utf-8")
        sys.stderr.write(f"wrote {SNAPSHOT.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
