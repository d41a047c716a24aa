"""The benchmark harness itself (not timings): what run_all.py runs and how it marks the targets,
and how timing.measure counts calls and reports memory."""

from __future__ import annotations

import argparse
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402
import timing  # noqa: E402


def options(**overrides) -> argparse.Namespace:
    values = dict(device="cuda", dtype=None, quick=False, size="full", cache_dir=None, only=None)
    return argparse.Namespace(**{**values, **overrides})


def test_cuda_runs_cover_every_fast_path_and_the_flows_twice():
    runs = run_all.commands(options(cache_dir="/tmp/cache"))
    diffuser = [argv for script, argv in runs if script == "bench_diffuser.py"]
    assert all(["--dtype", "fp16"] == argv[2:4] for argv in diffuser)
    assert ["--channels-last", "--compile", "--cache-dir", "/tmp/cache", "--cuda-graphs"] == diffuser[-1][6:11]
    flows = [argv for script, argv in runs if script == "bench_flows.py"]
    assert len(flows) == 2 and "--cuda-graphs" in flows[1] and "--cuda-graphs" not in flows[0]
    cpu = run_all.commands(options(device="cpu", only=["bench_diffuser"]))
    assert {script for script, _ in cpu} == {"bench_diffuser.py"}
    assert not any("--compile" in argv or "--cuda-graphs" in argv for _, argv in cpu)


def test_targets_are_marked_on_cuda_only():
    flow = {"bench": "text_to_image", "n": 2, "width": 512, "height": 512, "seconds": 0.7, "peak_mem_mb": 2900}
    line = run_all.normalise("bench_flows.py", {**flow, "device": "cuda:0"})
    assert line["median_ms"] == 700.0 and line["shape"] == [2, 3, 512, 512]
    assert (line["target_ms"], line["meets_target"]) == (600.0, False)
    assert (line["target_peak_mem_mb"], line["meets_memory_target"]) == (3072.0, True)
    assert line["fast_paths"] == run_all.PLAIN
    forward = {"bench": "diffuser_image_flow", "shape": [4, 4, 64, 64], "context_tokens": 77, "median_ms": 7.5}
    assert run_all.normalise("bench_diffuser.py", {**forward, "device": "cuda"})["meets_target"] is True
    assert "target_ms" not in run_all.normalise("bench_diffuser.py", {**forward, "context_tokens": 257, "device": "cuda"})
    assert "target_ms" not in run_all.normalise("bench_flows.py", {**flow, "device": "cpu"})


def test_measure_times_only_the_repeats_and_sees_cpu_activations():
    calls = []

    def allocate():
        calls.append(1)
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        return float(block[-1])

    result = timing.measure(allocate, torch.device("cpu"), repeats=3, warmup=2)
    assert len(calls) == 5 and result.last == 1.0 and result.median_ms > 0
    if timing.reset_peak_rss():  # Linux: the peak is reset, so only this 64 MB block counts
        assert 32 <= result.peak_mem_mb <= 256
