"""Speed and memory of Optimus decoding (4 captions), with and without the KV cache: one JSON line each.

    python benchmarks/bench_optimus.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--repeats N] [--quick]
        [--threads N]

The full-size GPT-2 decoder (12 layers, width 768, vocabulary 50260, latent 768) is built from its
config with random weights (nothing is downloaded); random weights rarely produce ``<EOS>``, so
every caption runs to the official 30 tokens — the worst case. Four latents are decoded greedily
(all at once) and by the official sampling (latent after latent, top_p 1.0), each with the KV
cache and with the official full-prefix recomputation. Default: CPU in float32, and CUDA in
float16 when a GPU is present. ``--quick``: 1 timed run (default 3).

Each line: ``{"bench", "device", "dtype", "shape", "median_ms", "min_ms", "max_ms", "repeats",
"threads", "peak_mem_mb", "tokens", "weights_mb"}`` (spread fields: ``timing.spread``); ``shape`` is the latents' shape, ``tokens`` the ids generated per run.
``peak_mem_mb`` as ``timing.measure`` defines it: ``torch.cuda.max_memory_allocated`` on CUDA
(weights included); on the CPU the rise of the process's peak RSS during the timed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a script; never reorder a test's path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.optimus.decoding import generate_token_ids  # noqa: E402
from vd_core.optimus.gpt2_decoder import GPT2DecoderConfig, GPT2LatentDecoder  # noqa: E402
from timing import measure, set_threads  # noqa: E402  (benchmarks/timing.py, beside this script)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL_SIZE = GPT2DecoderConfig(vocab_size=50260, hidden_size=768, num_layers=12, num_heads=12, max_positions=1024,
                              mlp_size=3072, latent_size=768)
BOS, EOS = 50258, 50259
N_CAPTIONS, MAX_LENGTH = 4, 30


def random_decoder(device: torch.device, dtype: torch.dtype) -> GPT2LatentDecoder:
    """The full-size decoder with GPT-2-like random weights (N(0, 0.02), LayerNorm 1/0)."""
    with torch.device("meta"):
        decoder = GPT2LatentDecoder(FULL_SIZE)
    decoder = decoder.to_empty(device=device)
    decoder.tie_weights()
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if ".ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return decoder.to(dtype).requires_grad_(False).eval()


def bench(device: torch.device, dtype: torch.dtype, repeats: int):
    decoder = random_decoder(device, dtype)
    weights_mb = sum(p.numel() * p.element_size() for p in decoder.parameters()) / 2**20
    latents = torch.randn(N_CAPTIONS, FULL_SIZE.latent_size, generator=torch.Generator().manual_seed(1))
    latents = latents.to(device=device, dtype=dtype)
    # Warm-up (kernels, allocator) on short runs of both paths.
    for use_kv_cache in (True, False):
        generate_token_ids(decoder, latents, bos_id=BOS, eos_id=EOS, greedy=True, max_length=3,
                           use_kv_cache=use_kv_cache)
    for mode in ("greedy", "sample"):
        for use_kv_cache in (True, False):
            run = partial(generate_token_ids, decoder, latents, bos_id=BOS, eos_id=EOS, greedy=mode == "greedy",
                          max_length=MAX_LENGTH, generator=torch.Generator().manual_seed(20),
                          use_kv_cache=use_kv_cache)
            result = measure(run, device, repeats, warmup=0)
            yield {
                "bench": f"optimus_decode_{mode}_{'kv' if use_kv_cache else 'nokv'}",
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "shape": list(latents.shape),
                **result.fields(),
                "peak_mem_mb": round(result.peak_mem_mb, 1),
                "tokens": sum(len(row) - 1 for row in result.last),  # <BOS> is given, not generated
                "weights_mb": round(weights_mb, 1),
            }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="only this device (default: cpu, and cuda if any)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp32 CPU, fp16 CUDA)")
    parser.add_argument("--repeats", type=int, help="timed runs (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="1 timed run per measurement")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timings on a shared machine)")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    repeats = args.repeats or (1 if args.quick else 3)
    for name in devices:
        device = torch.device(name)
        dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        with torch.inference_mode():
            for result in bench(device, dtype, repeats):
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
