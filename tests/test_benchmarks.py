"""The benchmark harness itself (not timings): what run_all.py runs and how it marks the targets,
and how timing.measure counts calls and reports memory."""

from __future__ import annotations

import argparse
import json
import sys
import time

import pytest
import torch

from conftest import ROOT
from vd_core.diffuser import DiffuserConfig

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402
import timing  # noqa: E402


def options(**overrides) -> argparse.Namespace:
    values = dict(device="cuda", dtype=None, quick=False, size="full", cache_dir=None, only=None, threads=None,
                  repeats=None, readme=False)
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


def test_readme_runs_are_the_speed_table_with_fixed_threads_and_repeats():
    runs = run_all.commands(options(device="cpu", readme=True, threads=2, repeats=3))
    assert [script for script, _ in runs] == ["bench_diffuser.py", "bench_diffuser.py", "bench_encoders.py",
                                              "bench_optimus.py"]
    assert "--compare-diffusers" in runs[1][1] and "--compare-diffusers" not in runs[0][1]
    for _, argv in runs:
        assert argv[argv.index("--threads") + 1] == "2" and argv[argv.index("--repeats") + 1] == "3"
        assert argv[argv.index("--device") + 1] == "cpu"
    again = run_all.commands(options(device="cpu", readme=True, threads=2, repeats=3, only=["bench_diffuser"]))
    assert again == runs[:2]
    memory = run_all.commands(options(device="cpu", threads=2, only=["bench_memory"]))
    assert memory == [("bench_memory.py", [])]  # it times nothing: no --threads


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


def test_measure_reports_the_spread_of_the_repeats():
    pauses = iter([0.002, 0.03, 0.008, 0.015])
    result = timing.measure(lambda: time.sleep(next(pauses)), torch.device("cpu"), repeats=4, warmup=0)
    fields = result.fields()
    assert fields["repeats"] == 4 == len(result.times_ms)
    assert fields["min_ms"] <= fields["median_ms"] <= fields["max_ms"]
    assert 2 <= fields["min_ms"] < 8 and fields["max_ms"] >= 30  # the shortest and the longest pause
    assert 8 <= fields["median_ms"] < 30  # between the two middle pauses (8 and 15 ms)
    assert fields["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, torch.device("cpu"), repeats=0)


def test_bench_diffuser_lines_carry_the_spread(monkeypatch, capsys):
    """A tiny model of the same architecture through the script's own main."""
    import bench_diffuser

    tiny = DiffuserConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), context_levels=(True, False),
                          context_dim=768, in_channels=4, out_channels=4, text_latent_dim=768, second_dim=4,
                          num_heads=1)
    monkeypatch.setitem(bench_diffuser.SIZES, "tiny", (tiny, 8))
    bench_diffuser.main(["--device", "cpu", "--size", "tiny", "--quick", "--repeats", "3",
                         "--threads", str(torch.get_num_threads())])
    lines = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert {line["bench"] for line in lines} == {"diffuser_image_flow", "diffuser_text_flow"} and len(lines) == 4
    for line in lines:
        assert line["repeats"] == 3 and line["threads"] == torch.get_num_threads()
        assert 0 < line["min_ms"] <= line["median_ms"] <= line["max_ms"]
        row = run_all.markdown_row(run_all.normalise("bench_diffuser.py", line))
        assert f"n={line['repeats']}" in row and line["bench"] in row


def test_step_clock_times_the_sampler_loop_alone():
    """A stand-in flow: 40 ms before the sampler (CLIP), 3 steps of 5 ms, 40 ms after (VAE)."""
    import bench_flows

    clock = bench_flows.StepClock(torch.device("cpu"))

    def flow():
        clock.start_run()
        options = clock.options(3)
        time.sleep(0.04)
        for step in range(options.steps):
            assert options.cancel() is False
            time.sleep(0.005)
            options.callback(step, options.steps, None, None)
        time.sleep(0.04)

    result = timing.measure(flow, torch.device("cpu"), repeats=2, warmup=0)
    assert len(clock.sampling_ms) == 2 and all(15 <= ms < 40 for ms in clock.sampling_ms)
    line = bench_flows.flow_line("text_to_image", torch.device("cpu"), torch.float32, 64, 1, 3, result, clock, {})
    assert line["sampling_repeats"] == line["repeats"] == 2 and line["median_ms"] >= 95
    assert line["sampling_min_ms"] <= line["sampling_median_ms"] <= line["sampling_max_ms"] < 40
    assert 0.005 <= line["seconds_per_step"] < 40 / 3 / 1000  # the steps' share only, not the 80 ms around them


def test_step_clock_sees_the_sampler_of_every_timed_flow(release_dir):
    """Through the real flows (release-layout miniature): one sampler-loop figure per run, inside
    the run's wall time (CLIP before it, the VAE / Optimus after it are outside)."""
    import bench_flows
    from vd_core.flows import dual_context, image_to_text, text_to_image
    from vd_core.models import load_models

    case = json.loads((release_dir / "expected" / "ddim.json").read_text())["t2i"]
    n, _, h, w = case["shape"]
    models = load_models(release_dir, flows=bench_flows.FLOWS)
    picture = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(0))
    runs = {
        "text_to_image": lambda o: text_to_image(models, "a red car", width=8 * w, height=8 * h, n=n, options=o),
        "image_to_text": lambda o: image_to_text(models, picture, n=n, options=o),
        "dual_context": lambda o: dual_context(models, "a red car", picture, text_strength=0.5, n=n,
                                               width=8 * w, height=8 * h, options=o),
    }
    assert set(runs) == set(bench_flows.FLOWS)
    for name, flow in runs.items():
        clock = bench_flows.StepClock(torch.device("cpu"))

        def run(flow=flow, clock=clock):
            clock.start_run()
            return flow(clock.options(case["steps"]))

        result = timing.measure(run, torch.device("cpu"), repeats=2, warmup=0)
        assert len(clock.sampling_ms) == 2, name
        assert all(0 < ms < total for ms, total in zip(clock.sampling_ms, result.times_ms, strict=True)), name
