"""Every node has a help page where ComfyUI's frontend looks for it, and search words.

Frontend 1.27 fetches ``/extensions/<pack folder>/docs/<NodeId>/<locale>.md``, then
``/extensions/<pack folder>/docs/<NodeId>.md`` (``NodeHelpService``); the pack's web folder is
``WEB_DIRECTORY``, served at ``/extensions/<pack folder>/``.
"""

from __future__ import annotations

import re

import pytest
from pack_import import ROOT, import_pack

pack = import_pack()
DOCS = ROOT / pack.WEB_DIRECTORY / "docs"
# Issue 11 removes this node (the VD Loader's MODEL output replaces it): it gets no page.
BEING_REMOVED = {"VDModelAsComfyModel"}
NODES = {k: v for k, v in pack.NODE_CLASS_MAPPINGS.items() if k not in BEING_REMOVED}
# Node modules of this pack whose classes carry SEARCH_ALIASES already (the rest: issue 11).
def test_the_web_folder_is_served_under_the_pack_folder():
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web" / "js" / "vd_text_on_node.js").is_file()


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_page_names_the_node_and_documents_every_input(node_id):
    cls = NODES[node_id]
    page = DOCS / f"{node_id}.md"
    assert page.is_file(), f"no help page {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {cls.DISPLAY_NAME}\n"), "the page starts with the node's display name"
    inputs = [name for section in ("required", "optional") for name in cls.INPUT_TYPES().get(section, {})]
    undocumented = [name for name in inputs if not re.search(rf"`{re.escape(name)}`", text)]
    assert not undocumented, f"{page.name} does not describe {undocumented}"
    assert "## Example" in text, f"{page.name} has no example"


def test_no_page_for_a_node_that_does_not_exist():
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(NODES)


def test_search_aliases():
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        aliases = cls.SEARCH_ALIASES
        assert isinstance(aliases, list) and aliases, cls.__name__
        assert all(isinstance(a, str) and a == a.strip().lower() and a for a in aliases), cls.__name__


def test_caption_words_find_the_decode_node():
    assert {"caption", "img2txt", "image to text"} <= set(pack.NODE_CLASS_MAPPINGS["VDOptimusTextDecode"].SEARCH_ALIASES)
