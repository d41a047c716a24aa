"""CLIP context and image VAE benchmarks on random full-size weights: one JSON line per measurement.

    python benchmarks/bench_encoders.py [--device cuda] [--dtype float16 bfloat16] [--quick]

    [--repeats N] [--vae-decode-batches B ...] [--threads N]

Each line: ``{"bench", "device", "dtype", "shape", "median_ms", "min_ms", "max_ms", "repeats",
"threads", "peak_mem_mb"}`` (the spread fields are ``timing.spread``'s; ``peak_mem_mb``
as ``timing.measure`` defines it: CUDA memory allocated, weights included; on the CPU the rise of
the peak RSS during the timed runs). Weights are random (no download), built from the released sizes.

To add an encoder, write a ``bench_<name>(device, dtype, quick)`` generator yielding result dicts
(use ``timing.measure``) and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a script; never reorder a test's path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.clip import CLIPContextEncoder, encoder_from_state_dict  # noqa: E402
from timing import Timing, measure, set_threads  # noqa: E402  (benchmarks/timing.py, beside this script)

# openai/clip-vit-large-patch14 (vd_reference README, "Full-size manifest").
CLIP_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768}
CLIP_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14, "projection_dim": 768}


def random_clip(device: torch.device, dtype: torch.dtype) -> CLIPContextEncoder:
    """A full-size CLIP ViT-L/14 context encoder with N(0, 0.02) weights, through the real loader."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    with torch.device("meta"):
        shapes = CLIPContextEncoder(CLIPTextConfig(**CLIP_TEXT), CLIPVisionConfig(**CLIP_VISION), 768).state_dict()
    generator = torch.Generator(device).manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator, device=device, dtype=dtype) * 0.02 for k, v in shapes.items()}
    config = {"text_config": CLIP_TEXT, "vision_config": CLIP_VISION}
    return encoder_from_state_dict(state, config)


def repeats_of(quick: bool, full: tuple[int, int]) -> tuple[int, int]:
    """``(warm-up, timed)`` calls: ``--repeats`` if given (one warm-up), else ``full`` or the quick ones."""
    if REPEATS:
        return 1, REPEATS
    return (1, 2) if quick else full


REPEATS = 0  # --repeats (0: each benchmark's default)


def bench_clip(device: torch.device, dtype: torch.dtype, quick: bool) -> Iterator[dict]:
    """CLIP text contexts from token ids, image contexts (with the CPU PIL preprocessing) with and
    without masks, and the preprocessing alone."""
    clip = random_clip(device, dtype)
    warmup, repeats = (1, 3) if quick and not REPEATS else repeats_of(quick, (3, 10))
    generator = torch.Generator().manual_seed(0)
    for batch in (1,) if quick else (1, 8):
        ids = torch.randint(0, 49406, (batch, 77), generator=generator)
        yield _row("clip_text_encode", device, dtype, ids.shape,
                   measure(lambda: clip.encode_text_ids(ids), device, repeats, warmup))
    for batch in (1,) if quick else (1, 4):
        images = torch.rand(batch, 3, 512, 512, generator=generator)  # the WebUI's input size
        masks = (torch.rand(batch, 1, 512, 512, generator=generator) > 0.3).float()
        yield _row("clip_image_encode", device, dtype, images.shape,
                   measure(lambda: clip.encode_image(images), device, repeats, warmup))
        yield _row("clip_image_encode_masked", device, dtype, images.shape,
                   measure(lambda: clip.encode_image(images, masks), device, repeats, warmup))
    yield _row("clip_image_preprocess", torch.device("cpu"), torch.float32, images.shape,
               measure(lambda: _preprocess(clip, images), torch.device("cpu"), repeats, warmup))


def bench_image_vae(device: torch.device, dtype: torch.dtype, quick: bool) -> Iterator[dict]:
    """The kl-f8 VAE (released sizes, default-initialised): decode of 512×512 images (the end of every
    image flow; 2 = text→image's default batch) and encode of one (image-to-image's start)."""
    from vd_core.image_vae import ImageVAE, ImageVAEConfig

    with torch.device(device):
        vae = ImageVAE(ImageVAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4))
    vae = vae.to(dtype).eval().requires_grad_(False)
    warmup, repeats = repeats_of(quick, (2, 5))
    generator = torch.Generator().manual_seed(0)
    for batch in (1,) if quick else VAE_DECODE_BATCHES:
        latents = torch.randn(batch, 4, 64, 64, generator=generator).to(device)
        decode = measure(lambda: vae.decode(latents), device, repeats, warmup)
        yield _row("image_vae_decode", device, dtype, latents.shape, decode)
    images = torch.rand(1, 3, 512, 512, generator=generator).to(device)
    encode = measure(lambda: vae.encode(images), device, repeats, warmup)
    yield _row("image_vae_encode", device, dtype, images.shape, encode)


def _preprocess(clip: CLIPContextEncoder, images: torch.Tensor) -> torch.Tensor:
    from vd_core.clip.preprocess import check_images, preprocess_images

    return preprocess_images(check_images(images), clip.preprocessing)


def _row(bench: str, device: torch.device, dtype: torch.dtype, shape, result: Timing) -> dict:
    return {"bench": bench, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
            **result.fields(), "peak_mem_mb": round(result.peak_mem_mb, 1)}


BENCHMARKS = [bench_clip, bench_image_vae]
VAE_DECODE_BATCHES = (1, 2)  # --vae-decode-batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on the CPU, float16 bfloat16 float32 on a GPU")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 1 warm-up and 3 timed runs")
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default: CLIP 10, VAE 5; --quick 3, 2)")
    parser.add_argument("--vae-decode-batches", type=int, nargs="+", default=[1, 2], help="VAE decode batch sizes")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timings on a shared machine)")
    args = parser.parse_args(argv)
    global REPEATS, VAE_DECODE_BATCHES
    REPEATS, VAE_DECODE_BATCHES = args.repeats or 0, tuple(args.vae_decode_batches)
    set_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtype or (["float32"] if device.type == "cpu" else ["float16", "bfloat16", "float32"])
    torch.set_grad_enabled(False)
    for name in dtypes:
        for bench in BENCHMARKS:
            for row in bench(device, getattr(torch, name), args.quick):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
