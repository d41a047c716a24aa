"""benchmarks/bench_memory.py: the per-flow weight counts, pinned against the official key manifest
(``vd-four-flow-v1-0.keys.tsv``: every full-size tensor's shape), which the benchmark never reads."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import ROOT, reference_dir

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_memory  # noqa: E402

# Part -> manifest key prefixes (the released names: algorithm.md §1, §5, §6).
MANIFEST_PREFIXES = {
    "time_embed": ("diffuser.image.time_embed.",),
    "image_data": ("diffuser.image.data_blocks.",),
    "text_data": ("diffuser.text.data_blocks.",),
    "image_context": ("diffuser.image.context_blocks.",),
    "text_context": ("diffuser.text.context_blocks.",),
    "clip_text": ("ctx.text.model.text_model.", "ctx.text.model.text_projection."),
    "clip_vision": ("ctx.image.model.vision_model.", "ctx.image.model.visual_projection."),
    "optimus": ("vae.text.",),
    "image_vae": ("vae.image.",),
}
DIFFUSER = ["time_embed", "image_data", "text_data", "image_context", "text_context"]
# What each flow computes with (issue 11, "Only what the graph uses"), besides the time embedding.
FLOW_USES = {
    "text_to_image": ["image_data", "text_context", "clip_text", "image_vae"],
    "image_variation": ["image_data", "image_context", "clip_vision", "image_vae"],
    "dual_context": ["image_data", "image_context", "text_context", "clip_text", "clip_vision", "image_vae"],
    "multi_context": ["image_data", "image_context", "text_context", "clip_text", "clip_vision", "image_vae"],
    "image_to_text": ["text_data", "image_context", "clip_vision", "optimus"],
    "text_variation": ["text_data", "text_context", "clip_text", "optimus"],
    "edit_image_with_text": [*DIFFUSER[1:], "clip_text", "clip_vision", "optimus", "image_vae"],
}


@pytest.fixture(scope="module")
def config_path():
    path = reference_dir() / bench_memory.CONFIG_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found (set VD_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="module")
def manifest_counts(config_path) -> dict[str, int]:
    """Parameters per part summed from the manifest's shapes (a tied tensor counted once)."""
    counts = dict.fromkeys(MANIFEST_PREFIXES, 0)
    counted = set()
    for row in (config_path.parent / "vd-four-flow-v1-0.keys.tsv").read_text().splitlines():
        if row.startswith("#"):
            continue
        key, shape, _dtype, kind, _numel, note = (row.split("\t") + [""])[:6]
        if kind != "parameter" or note.startswith("tied:") and note[len("tied:"):] in counted:
            continue
        counted.add(key)
        for part, prefixes in MANIFEST_PREFIXES.items():
            if key.startswith(prefixes):
                counts[part] += math.prod(int(d) for d in shape.split(",") if d)
    return counts


def test_every_part_built_by_the_pack_has_the_official_parameter_count(config_path, manifest_counts):
    assert bench_memory.part_params(str(config_path)) == manifest_counts
    assert sum(manifest_counts[p] for p in DIFFUSER) == 2_566_318_852  # "2.57 B" (issue 11)


def test_each_flow_counts_exactly_its_parts_before_and_after(config_path, manifest_counts):
    lines = bench_memory.lines(config_path, ("fp16", "fp32"))
    assert {(line["flow"], line["dtype"]) for line in lines} == {(f, d) for f in FLOW_USES for d in ("fp16", "fp32")}
    for line in lines:
        uses = FLOW_USES[line["flow"]]
        extras = [p for p in ("optimus", "image_vae") if p in uses]
        after = sum(manifest_counts[p] for p in ["time_embed", *uses])
        before = sum(manifest_counts[p] for p in [*DIFFUSER, "clip_text", "clip_vision", *extras])
        size = {"fp16": 2, "fp32": 4}[line["dtype"]]
        assert (line["after_params"], line["before_params"]) == (after, before), line["flow"]
        assert (line["after_bytes"], line["before_bytes"]) == (after * size, before * size), line["flow"]
        assert line["saved_bytes"] == (before - after) * size


def test_run_all_runs_the_memory_benchmark():
    import run_all

    class Options:
        device, dtype, quick, size, cache_dir, only = "cpu", None, False, "full", None, ["bench_memory"]

    assert [script for script, _ in run_all.commands(Options())] == ["bench_memory.py"]
