"""Speed and memory of the four-flow diffuser on random weights: one JSON line per measurement.

    python benchmarks/bench_diffuser.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--repeats N] [--quick]
        [--size full|mid] [--channels-last] [--compile [--compile-mode M] [--cache-dir D]] [--cuda-graphs]
        [--ddim-steps S] [--threads N] [--compare-diffusers]

Measures one forward of the image flow (batch 2 and 4, 64×64 latent = 512×512 px) and of the text
flow (batch 8, 768-d latent), each under a 77-token text context and a 257-token image context.
Batch 4 / batch 8 are what 2 images / 4 captions cost with classifier-free guidance. Default: CPU
in float32, and CUDA in float16 when a GPU is present. ``--quick``: image batch 2 and text batch 8,
2 repeats. ``--size mid`` is a CPU-sized model of the same architecture (model_channels 64,
2 heads: head widths 32–128 like the release's 40–160; 32×32 latents).

The fast paths of ``vd_core.acceleration`` are chosen with ``--channels-last``, ``--compile`` and
``--cuda-graphs``. ``--ddim-steps S`` also times whole guided DDIM loops (guidance 7.5, S steps,
the sampler the flows use, no VAE/Optimus): 2 images and 4 captions. ``--compare-diffusers``
instead times the image flow with a text context and diffusers' ``UNet2DConditionModel`` (eager,
SDPA) of the same sizes in alternation (diffusers is not a dependency of the pack; install it to
compare; these lines have no peak memory).

Each line: ``{"bench", "device", "dtype", "shape", "context_tokens", "median_ms", "min_ms", "max_ms",
"repeats", "threads", "peak_mem_mb", "weights_mb", "fast_paths"}`` (DDIM lines add ``steps``; the
spread fields are ``timing.spread``'s); ``peak_mem_mb`` as ``timing.measure``
defines it (CUDA: allocated, weights included; CPU: the activations' RSS high-water mark). The
first call (warm-up) is not timed: with ``--compile`` it compiles, with ``--cuda-graphs`` it records.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a script; never reorder a test's path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.acceleration import COMPILE_MODES, accelerate_diffuser  # noqa: E402
from vd_core.diffuser import ContextInput, DiffuserConfig, DiffuserParts, FourFlowDiffuser  # noqa: E402
from vd_core.samplers import BatchNoise, GuidedEps, sample_ddim  # noqa: E402
from timing import measure, set_threads, spread  # noqa: E402  (benchmarks/timing.py, beside this script)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONTEXT_TOKENS = {"text": 77, "image": 257}
# (config, image latent side)
SIZES = {
    "full": (DiffuserConfig.full_size(), 64),
    "mid": (
        DiffuserConfig(
            model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
            context_levels=(True, True, True, False), context_dim=768, in_channels=4, out_channels=4,
            text_latent_dim=768, second_dim=4, num_heads=2,
        ),
        32,
    ),
}


def random_diffuser(config: DiffuserConfig, parts: DiffuserParts, device, dtype) -> FourFlowDiffuser:
    """A diffuser with ``parts``, default-initialised directly on ``device``."""
    with torch.device("meta"):
        model = FourFlowDiffuser(config, parts)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model.requires_grad_(False).eval()


def fast_paths(args) -> dict:
    """The ``accelerate_diffuser`` settings of this run (also printed in every line)."""
    return {
        "channels_last": args.channels_last,
        "compile": args.compile_mode if args.compile else False,
        "cuda_graphs": args.cuda_graphs,
    }


def accelerated(model: FourFlowDiffuser, args):
    settings = fast_paths(args)
    if not any(settings.values()):
        return model
    return accelerate_diffuser(
        model,
        channels_last=args.channels_last,
        compile=args.compile,
        compile_mode=args.compile_mode,
        cache_dir=args.cache_dir,
        cuda_graphs=args.cuda_graphs,
    )


def row(bench: str, device, dtype, shape, tokens, times_ms, peak_mb, weights_mb, args, **extra) -> dict:
    return {
        "bench": bench,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(shape),
        "context_tokens": tokens,
        **spread(times_ms),
        "peak_mem_mb": None if peak_mb is None else round(peak_mb, 1),
        "weights_mb": round(weights_mb, 1),
        "fast_paths": fast_paths(args),
        **extra,
    }


def data_shape(config: DiffuserConfig, data_kind: str, batch: int, side: int) -> tuple[int, ...]:
    return (batch, config.in_channels, side, side) if data_kind == "image" else (batch, config.text_latent_dim)


def bench_flow(data_kind: str, batches: list[int], device, dtype, args):
    """Yield one forward result per (batch, context kind), then the DDIM loops if asked."""
    config, side = SIZES[args.size]
    parts = DiffuserParts.for_flow(data_kind, list(CONTEXT_TOKENS))
    plain = random_diffuser(config, parts, device, dtype)
    model = accelerated(plain, args)
    weights_mb = sum(p.numel() * p.element_size() for p in plain.parameters()) / 2**20
    generator = torch.Generator(device).manual_seed(0)
    for batch in batches:
        shape = data_shape(config, data_kind, batch, side)
        x = torch.randn(shape, generator=generator, device=device).to(dtype)
        t = torch.full((batch,), 500, device=device)
        for kind, tokens in CONTEXT_TOKENS.items():
            context = torch.randn(batch, tokens, config.context_dim, generator=generator, device=device).to(dtype)
            with torch.inference_mode():
                result = measure(lambda: model(x, t, [ContextInput(kind, context)]), device, args.repeats)
            yield row(f"diffuser_{data_kind}_flow", device, dtype, shape, tokens, result.times_ms, result.peak_mem_mb,
                      weights_mb, args)
    if args.ddim_steps:
        yield bench_ddim(model, data_kind, device, dtype, weights_mb, args)


def bench_ddim(model, data_kind: str, device, dtype, weights_mb: float, args) -> dict:
    """A guided DDIM run as the flows do it: 2 images under a text context (text→image) or
    4 captions under an image context (image→text), guidance 7.5 (a doubled batch per step)."""
    config, side = SIZES[args.size]
    n, kind = (2, "text") if data_kind == "image" else (4, "image")
    tokens = CONTEXT_TOKENS[kind]
    generator = torch.Generator(device).manual_seed(1)
    cond, uncond = (
        torch.randn(n, tokens, config.context_dim, generator=generator, device=device).to(dtype) for _ in "cu"
    )
    shape = data_shape(config, data_kind, n, side)

    def run():
        eps = GuidedEps(model, [ContextInput(kind, cond)], [ContextInput(kind, uncond)], 7.5)
        noise = BatchNoise(0)
        return sample_ddim(eps, noise(torch.empty(shape, device=device, dtype=dtype)), args.ddim_steps, noise=noise)

    with torch.inference_mode():
        result = measure(run, device, max(1, args.repeats // 2))
    bench = f"diffuser_{data_kind}_ddim"
    return row(bench, device, dtype, shape, tokens, result.times_ms, result.peak_mem_mb, weights_mb, args,
               steps=args.ddim_steps)


def diffusers_unet(config: DiffuserConfig, side: int, device, dtype):
    """diffusers' ``UNet2DConditionModel`` with the image diffuser's sizes (SD1.x's architecture)."""
    from diffusers import UNet2DConditionModel

    levels = range(len(config.channel_mult))
    if len(set(config.num_res_blocks)) != 1:
        raise SystemExit("--compare-diffusers needs the same number of res blocks on every level")
    down = tuple("CrossAttnDownBlock2D" if config.context_levels[i] else "DownBlock2D" for i in levels)
    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=config.level_widths,
        layers_per_block=config.num_res_blocks[0],
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.num_heads,  # diffusers' SD1 configs: this field is the head count
        norm_num_groups=32,
    )
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def bench_against_diffusers(batches: list[int], device, dtype, args):
    """The image flow under a 77-token text context next to diffusers' eager UNet (SDPA attention)
    of the same sizes: an independent implementation of the same architecture. The two are timed
    in alternation (one forward each per round), so machine load affects both alike."""
    config, side = SIZES[args.size]
    ours = accelerated(random_diffuser(config, DiffuserParts.for_flow("image", ["text"]), device, dtype), args)
    theirs = diffusers_unet(config, side, device, dtype)
    if args.channels_last:
        theirs.to(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(0)
    tokens = CONTEXT_TOKENS["text"]
    for batch in batches:
        shape = data_shape(config, "image", batch, side)
        x = torch.randn(shape, generator=generator, device=device).to(dtype)
        t = torch.full((batch,), 500, device=device)
        context = torch.randn(batch, tokens, config.context_dim, generator=generator, device=device).to(dtype)
        x_theirs = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
        runs = {
            "diffuser_image_flow": (ours, lambda: ours(x, t, [ContextInput("text", context)])),
            "diffusers_unet_image_flow": (theirs, lambda: theirs(x_theirs, t, encoder_hidden_states=context).sample),
        }
        times = {name: [] for name in runs}
        with torch.inference_mode():
            for _, fn in runs.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for name, (_, fn) in runs.items():
                    times[name].append(measure(fn, device, 1, warmup=0).median_ms)
        for name, (model, _) in runs.items():
            weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            yield row(name, device, dtype, shape, tokens, times[name], None, weights_mb,
                      args, parameters=sum(p.numel() for p in model.parameters()), compared="alternating")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="only this device (default: cpu, and cuda if any)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights/data dtype (default: fp32 CPU, fp16 CUDA)")
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="image batch 2 and text batch 8 only, 2 repeats")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: the release; mid: CPU-sized")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timings on a shared machine)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolution weights and activations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the diffuser (first call compiles)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    parser.add_argument("--cache-dir", help="persistent Inductor cache directory for --compile")
    parser.add_argument("--cuda-graphs", action="store_true", help="record each forward once and replay it (CUDA)")
    parser.add_argument("--ddim-steps", type=int, default=0, help="also time guided DDIM loops of this many steps")
    parser.add_argument("--compare-diffusers", action="store_true",
                        help="only: the image flow vs diffusers' UNet2DConditionModel of the same sizes, alternating")
    args = parser.parse_args(argv)

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    args.repeats = args.repeats or (2 if args.quick else 5)
    image_batches = [2] if args.quick else [2, 4]
    set_threads(args.threads)
    torch.set_flush_denormal(True)
    for name in devices:
        device = torch.device(name)
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        if args.compare_diffusers:
            if importlib.util.find_spec("diffusers") is None:
                raise SystemExit("--compare-diffusers: diffusers is not installed (pip install diffusers)")
            benches = [bench_against_diffusers(image_batches, device, dtype, args)]
        else:
            benches = [bench_flow(kind, batches, device, dtype, args) for kind, batches in
                       (("image", image_batches), ("text", [8]))]
        for bench in benches:  # generators: each builds its models when it starts
            for result in bench:
                print(json.dumps(result), flush=True)
            gc.collect()  # the finished generator's models
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
