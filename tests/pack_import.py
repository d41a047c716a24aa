"""Import the repository root as a package, the way ComfyUI imports a custom-node folder.

The pack's ``nodes/`` package must only be imported relatively (ComfyUI owns a top-level module
named ``nodes``), so tests load the root ``__init__.py`` under a neutral package name and reach
the nodes as ``vd_pack.nodes``. The pack's ``vd_core`` is then ``vd_pack.vd_core``, a separate
copy of the top-level ``vd_core`` modules: use its exception classes when testing nodes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "vd_pack"


def import_pack():
    """The pack package (imported once per test session)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
