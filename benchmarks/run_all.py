"""Run every benchmark script and print one normalised JSON line per measurement.

    python benchmarks/run_all.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--quick] [--size full|mid]
        [--cache-dir D] [--only NAME ...] [--threads N] [--repeats N] [--out results.jsonl] [--markdown F]
    python benchmarks/run_all.py --readme --device cpu --threads 2 [--repeats 3] [--markdown F]

``--readme`` runs exactly the measurements of the README's "Speed" table (``README_RUNS``):
full-size diffuser forwards (image batch 2, text batch 8, both contexts), the same image forward
next to diffusers' UNet (needs ``diffusers`` importable; otherwise that line is an error line),
CLIP contexts, the image VAE (batch 1) and Optimus decoding, each with ``--repeats`` timed runs.

Each script runs in its own process (its peak memory is its own, compiled state does not leak),
``bench_diffuser.py`` once per fast-path setting:

* CPU: plain, channels-last (``torch.compile`` does not pay on the CPU and takes minutes);
* CUDA: plain, channels-last, channels-last + compile, channels-last + compile + CUDA graphs; the
  plain and the fastest setting also time 50-step guided DDIM loops.

Every line keeps the script's own fields and has at least ``script``, ``bench``, ``device``,
``dtype``, ``shape``, ``median_ms``, ``min_ms``, ``max_ms``, ``repeats`` (``timing.spread``),
``peak_mem_mb`` and ``fast_paths`` (``bench_flows.py``'s ``shape`` is ``[n, 3, height, width]``). On
CUDA, lines with a target of the speed issue add ``target_ms`` and ``meets_target`` (and
``target_peak_mem_mb``, ``meets_memory_target`` for text→image's 3 GB). A script
that fails gives a line with ``error`` and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PLAIN = {"channels_last": False, "compile": False, "cuda_graphs": False}
# Issue targets on an H100 in fp16: (bench, batch, context tokens) -> ms.
TARGETS_MS = {
    ("diffuser_image_flow", 4, 77): 8.0,
    ("diffuser_text_flow", 8, 257): 3.0,
    ("text_to_image", 2, None): 600.0,
    ("image_to_text", 4, None): 400.0,
}
# Peak GPU memory, only the parts the flow needs loaded: (bench, batch, context tokens) -> MB.
TARGETS_PEAK_MEM_MB = {("text_to_image", 2, None): 3072.0}


def diffuser_runs(device: str, cache_dir: str | None) -> list[list[str]]:
    """``bench_diffuser.py`` fast-path settings to measure on ``device``."""
    if device == "cpu":
        return [[], ["--channels-last"]]
    compiled = ["--channels-last", "--compile"] + (["--cache-dir", cache_dir] if cache_dir else [])
    return [
        ["--ddim-steps", "50"],
        ["--channels-last"],
        compiled,
        compiled + ["--cuda-graphs", "--ddim-steps", "50"],
    ]


def flow_runs(device: str) -> list[list[str]]:
    """``bench_flows.py`` settings: plain, and on CUDA the fast paths the flows can use."""
    if device == "cpu":
        return [[]]
    return [[], ["--channels-last", "--cuda-graphs"]]


# Scripts that take --threads and --repeats (bench_memory.py measures no time).
TIMED = ("bench_diffuser.py", "bench_encoders.py", "bench_optimus.py", "bench_flows.py")


def readme_runs(device: str) -> list[tuple[str, list[str]]]:
    """The README "Speed" table's measurements: ``(script, arguments)`` without threads/repeats."""
    common = ["--device", device]
    return [
        ("bench_diffuser.py", common + ["--quick"]),  # image batch 2, text batch 8; 77 / 257 tokens
        ("bench_diffuser.py", common + ["--quick", "--compare-diffusers"]),  # image batch 2, alternating
        ("bench_encoders.py", common + ["--vae-decode-batches", "1"]),  # CLIP 1 / 8 prompts, 1 / 4 images
        ("bench_optimus.py", common),
    ]


def with_run_options(runs, args) -> list[tuple[str, list[str]]]:
    """Add ``--threads`` / ``--repeats`` to the timed scripts."""
    threads, repeats = getattr(args, "threads", None), getattr(args, "repeats", None)  # callers' older options
    extra = (["--threads", str(threads)] if threads else []) + (["--repeats", str(repeats)] if repeats else [])
    return [(script, argv + extra if script in TIMED else argv) for script, argv in runs]


def commands(args) -> list[tuple[str, list[str]]]:
    """``(script, arguments)`` for every process to run."""
    if getattr(args, "readme", False):
        return with_run_options(only(readme_runs(args.device), args), args)
    dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    common = ["--device", args.device] + (["--quick"] if args.quick else [])
    encoder_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    runs = [
        ("bench_diffuser.py", common + ["--dtype", dtype, "--size", args.size] + extra)
        for extra in diffuser_runs(args.device, args.cache_dir)
    ]
    runs += [
        ("bench_encoders.py", common + ["--dtype", encoder_dtype]),
        ("bench_optimus.py", common + ["--dtype", dtype]),
        *(("bench_flows.py", common + ["--dtype", dtype] + extra) for extra in flow_runs(args.device)),
        ("bench_memory.py", []),  # weight bytes per flow, fp16 and fp32, on the meta device
    ]
    return with_run_options(only(runs, args), args)


def only(runs, args) -> list[tuple[str, list[str]]]:
    """The runs of the scripts ``--only`` names (all without it)."""
    return [(script, argv) for script, argv in runs if not args.only or Path(script).stem in args.only]


def normalise(script: str, line: dict) -> dict:
    """Add the common fields a script's line may lack."""
    line = {"script": script, **line}
    if "median_ms" not in line and "seconds" in line:
        line["median_ms"] = round(1000 * line["seconds"], 1)
    if "shape" not in line and {"n", "width", "height"} <= line.keys():
        line["shape"] = [line["n"], 3, line["height"], line["width"]]
    line.setdefault("fast_paths", PLAIN)
    shape = line.get("shape") or [None]
    key = (line.get("bench"), shape[0], line.get("context_tokens"))
    if line.get("device", "").startswith("cuda"):
        if key in TARGETS_MS:
            line["target_ms"] = TARGETS_MS[key]
            line["meets_target"] = line["median_ms"] <= TARGETS_MS[key]
        if key in TARGETS_PEAK_MEM_MB:
            line["target_peak_mem_mb"] = TARGETS_PEAK_MEM_MB[key]
            line["meets_memory_target"] = line["peak_mem_mb"] <= TARGETS_PEAK_MEM_MB[key]
    return line


def markdown_row(line: dict) -> str:
    """One line as a table row: time as median [min–max] of n, in s above 1 s."""
    def fmt(ms):
        return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"

    if "error" in line:
        return f"| {line['script']} {' '.join(line['argv'])} | error: {line['error']} | | |"
    if line.get("median_ms") is None:
        return f"| {line['script']} {line.get('bench')} | (no timing) | | |"
    tokens = f", {line['context_tokens']} tokens" if line.get("context_tokens") else ""
    time = f"{fmt(line['median_ms'])} [{fmt(line['min_ms'])}–{fmt(line['max_ms'])}, n={line['repeats']}]"
    peak = "—" if line.get("peak_mem_mb") is None else f"+{line['peak_mem_mb']:.0f} MB"
    shape = " × ".join(map(str, line.get("shape") or []))
    return f"| {line['bench']}{tokens} | {shape} | {time}, {line.get('threads')} threads | {peak} |"


def run(script: str, argv: list[str]) -> tuple[list[dict], str | None]:
    """The JSON lines ``script`` printed, and an error text if it failed."""
    process = subprocess.run(
        [sys.executable, str(HERE / script), *argv], capture_output=True, text=True, check=False
    )
    lines = []
    for text in process.stdout.splitlines():
        try:
            lines.append(normalise(script, json.loads(text)))
        except json.JSONDecodeError:
            sys.stderr.write(f"{script}: {text}\n")
    sys.stderr.write(process.stderr[-4000:] if process.returncode else "")
    error = None
    if process.returncode:
        error = f"exit status {process.returncode}: {process.stderr.strip().splitlines()[-1:]}"
    return lines, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="every script's --quick")
    parser.add_argument("--size", choices=["full", "mid"], default="full", help="bench_diffuser.py model size")
    parser.add_argument("--cache-dir", help="persistent torch.compile cache for the compiled runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these scripts (e.g. bench_diffuser)")
    parser.add_argument("--threads", type=int, help="every timed script's --threads (CPU on a shared machine)")
    parser.add_argument("--repeats", type=int, help="every timed script's --repeats (default: each script's)")
    parser.add_argument("--readme", action="store_true", help="only the README Speed table's measurements")
    parser.add_argument("--out", type=Path, help="also append the lines to this file")
    parser.add_argument("--markdown", type=Path, help="also append each line as a README table row here")
    args = parser.parse_args(argv)
    if args.readme and args.repeats is None:
        args.repeats = 3

    failed = False
    for script, script_argv in commands(args):
        lines, error = run(script, script_argv)
        if error:
            failed = True
            lines.append({"script": script, "argv": script_argv, "error": error})
        for line in lines:
            text = json.dumps(line)
            print(text, flush=True)
            if args.out:
                with args.out.open("a", encoding="utf-8") as out:
                    out.write(text + "\n")
            if args.markdown:
                with args.markdown.open("a", encoding="utf-8") as out:
                    out.write(markdown_row(line) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
