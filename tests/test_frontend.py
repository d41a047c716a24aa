"""Every example workflow in the real ComfyUI frontend (headless Chromium), and a caption on the
decode node after running the image→text example (tools/check_frontend.py says what is checked).

Needs Debian's chromium and chromium-driver, a ComfyUI work tree with its python
($VD_COMFYUI_DIR, $VD_COMFY_PYTHON: comfy_runtime.py) and the tiny reference release
($VD_REFERENCE_DIR). Skipped when one is missing, except under CI=true (comfy_runtime.unavailable),
where a missing piece fails. Screenshots go to $VD_FRONTEND_OUT, else to the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_frontend

from comfy_runtime import unavailable

REFERENCE = Path(os.environ.get("VD_REFERENCE_DIR", ROOT.parent / "shared" / "vd_reference"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> list[str]:
    needs = {
        "chromium (apt-get install chromium)": CHROMIUM,
        "chromedriver (apt-get install chromium-driver)": CHROMEDRIVER,
        f"the tiny release in {REFERENCE} (VD_REFERENCE_DIR)": (REFERENCE / "tiny_release").is_dir(),
    }
    return [what for what, present in needs.items() if not present]


def test_examples_load_clean_and_the_caption_shows_on_the_node(tmp_path, comfy_python):
    COMFY, PYTHON = comfy_python
    missing = _missing()
    if missing:
        unavailable("browser test needs " + "; ".join(missing))
    workflows = sorted((ROOT / "example_workflows").glob("*.json"))
    assert workflows
    out = Path(os.environ.get("VD_FRONTEND_OUT") or tmp_path / "frontend")
    failures = check_frontend.check(workflows, out, COMFY, PYTHON, REFERENCE, CHROMIUM, CHROMEDRIVER, run_steps=5)
    assert failures == [], "\n".join(failures)
    for path in workflows:
        assert (out / f"{path.stem}.png").stat().st_size > 10_000, f"no screenshot of {path.name}"
    assert list(out.glob("*_after_run.png"))
