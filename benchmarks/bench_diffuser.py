"""Speed and memory of one full-size diffuser forward, on random weights: one JSON line per measurement.

    python benchmarks/bench_diffuser.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--repeats N] [--quick]

Measures the image flow (batch 2 and 4, 64×64 latent = 512×512 px) and the text flow (batch 8,
768-d latent), each under a 77-token text context and a 257-token image context. Default: CPU in
float32, and CUDA in float16 when a GPU is present. ``--quick`` runs image batch 2 and text batch 8
with 2 repeats (a full-size CPU forward takes seconds).

Each line: ``{"bench", "device", "dtype", "shape", "context_tokens", "median_ms", "peak_mem_mb",
"weights_mb"}``. ``peak_mem_mb`` is ``torch.cuda.max_memory_allocated`` on CUDA (weights
included); on the CPU it is how far the process's peak RSS (``resource.ru_maxrss``) rose above
its RSS before the measurement, i.e. the activations' high-water mark (0 when it stayed below an
earlier peak).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.diffuser import ContextInput, DiffuserConfig, DiffuserParts, FourFlowDiffuser  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONTEXT_TOKENS = {"text": 77, "image": 257}


def random_diffuser(parts: DiffuserParts, device: torch.device, dtype: torch.dtype) -> FourFlowDiffuser:
    """The full-size diffuser with ``parts``, default-initialised directly on ``device``."""
    with torch.device("meta"):
        model = FourFlowDiffuser(DiffuserConfig.full_size(), parts)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model.requires_grad_(False).eval()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall time of ``fn()`` in ms after one warm-up call, and peak memory in MB."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before)
    return statistics.median(times), peak


def bench_flow(data_kind: str, batches: list[int], device: torch.device, dtype: torch.dtype, repeats: int):
    """Yield one result per (batch, context kind) for the flow with ``data_kind`` data."""
    parts = DiffuserParts.for_flow(data_kind, list(CONTEXT_TOKENS))
    model = random_diffuser(parts, device, dtype)
    config = model.config
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    generator = torch.Generator(device).manual_seed(0)
    for batch in batches:
        if data_kind == "image":
            shape = (batch, config.in_channels, 64, 64)
        else:
            shape = (batch, config.text_latent_dim)
        x = torch.randn(shape, generator=generator, device=device).to(dtype)
        t = torch.full((batch,), 500, device=device)
        for kind, tokens in CONTEXT_TOKENS.items():
            context = torch.randn(batch, tokens, config.context_dim, generator=generator, device=device).to(dtype)
            with torch.inference_mode():
                median_ms, peak_mb = measure(lambda: model(x, t, [ContextInput(kind, context)]), device, repeats)
            yield {
                "bench": f"diffuser_{data_kind}_flow",
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "shape": list(shape),
                "context_tokens": tokens,
                "median_ms": round(median_ms, 1),
                "peak_mem_mb": round(peak_mb, 1),
                "weights_mb": round(weights_mb, 1),
            }
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="only this device (default: cpu, and cuda if any)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights/data dtype (default: fp32 CPU, fp16 CUDA)")
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="image batch 2 and text batch 8 only, 2 repeats")
    args = parser.parse_args(argv)

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    repeats = args.repeats or (2 if args.quick else 5)
    image_batches = [2] if args.quick else [2, 4]
    torch.set_flush_denormal(True)
    for name in devices:
        device = torch.device(name)
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        for data_kind, batches in (("image", image_batches), ("text", [8])):
            for result in bench_flow(data_kind, batches, device, dtype, repeats):
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
