"""Speed and memory of whole VD flows on full-size random weights: one JSON line per measurement.

    python benchmarks/bench_flows.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--quick] [--repeats N]
        [--threads N] [--channels-last] [--compile [--cache-dir D]] [--cuda-graphs] [--flows NAME ...]

Measures, through the public flow functions of ``vd_core.flows``:

* ``text_to_image``: 512×512, 50 DDIM steps, 2 images (the WebUI's defaults);
* ``image_to_text``: 4 captions from a 512×512 image, 50 DDIM steps + Optimus sampling;
* ``dual_context``: a prompt and an image (text strength 0.5), 512×512, 50 steps, 2 images.

The models are the released sizes with random weights (nothing is read or downloaded), and each
flow gets only the parts ``vd_core.models.load_models`` would load for it (``FLOW_NEEDS``: e.g.
text→image holds the image data layers, the text context layers and CLIP's text tower): the
diffuser and CLIP ViT-L/14 in ``--dtype``, the image VAE and Optimus in float32. The diffuser's
fast paths (``vd_core.acceleration``) are chosen as in ``bench_diffuser.py``. The tokenizers are
stand-ins of the right vocabulary sizes, so captions are gibberish; their cost is that of real
ones. ``--quick`` runs 256×256, 4 steps, 1 image and 2 captions (a smoke test of the script; a
CPU run still needs the full-size weights: about 13 GB of RAM in float32, 7 GB in bf16).

Each line: ``{"bench", "device", "dtype", "width", "height", "n", "steps", "median_ms", "min_ms",
"max_ms", "repeats", "threads", "sampling_median_ms", "sampling_min_ms", "sampling_max_ms",
"sampling_repeats", "seconds", "seconds_per_step", "peak_mem_mb", "fast_paths"}``. The whole flow
(``median_ms`` …, ``timing.spread``) is timed ``--repeats`` times (default 3, ``--quick`` 2; a
full-size CPU run takes minutes each) after a 2-step warm-up of the same flow. ``sampling_*`` is
the sampler loop alone, from the check before its first step to the callback after its last
(``StepClock``), so ``seconds_per_step`` (its median / steps) is the diffuser's (guided forwards
and the sampler update) without CLIP, the VAE or Optimus; ``seconds`` is the whole flow's median.
``peak_mem_mb`` is ``torch.cuda.max_memory_allocated`` (weights included) on CUDA and the rise of
the process's peak RSS during the timed runs on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a script; never reorder a test's path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.acceleration import accelerate_diffuser  # noqa: E402
from vd_core.clip import CLIPContextEncoder  # noqa: E402
from vd_core.diffuser import DiffuserConfig, FourFlowDiffuser  # noqa: E402
from vd_core.flows import SamplingOptions, dual_context, image_to_text, text_to_image  # noqa: E402
from vd_core.image_vae import ImageVAE, ImageVAEConfig  # noqa: E402
from vd_core.models import FLOW_NEEDS, VDModels, clip_towers_for, diffuser_parts_for  # noqa: E402
from vd_core.optimus import OptimusVAE  # noqa: E402
from vd_core.optimus.bert_encoder import BertEncoderConfig  # noqa: E402
from vd_core.optimus.gpt2_decoder import GPT2DecoderConfig  # noqa: E402
from vd_core.optimus.tokenizers import find_optimus_tokenizers  # noqa: E402
from timing import measure, set_threads, spread  # noqa: E402  (benchmarks/timing.py, beside this script)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOWS = ("text_to_image", "image_to_text", "dual_context")
CLIP_BOS, CLIP_EOS = 49406, 49407
BERT_VOCAB, GPT2_BPE_VOCAB = 28996, 50257  # bert-base-cased, GPT-2 (Optimus adds 3 tokens)


class StandInCLIPTokenizer:
    """Prompts → ``<|startoftext|>``, one stable pseudo-id per word, ``<|endoftext|>``."""

    eos_token_id = pad_token_id = CLIP_EOS

    def __call__(self, prompts, **kwargs):
        ids = [[CLIP_BOS, *(zlib.crc32(w.encode()) % CLIP_BOS for w in p.split()), CLIP_EOS] for p in prompts]
        return {"input_ids": ids}


def stand_in_optimus_tokenizers(folder: Path):
    """Vocabulary files of the release's sizes (GPT-2 tokens drawn from the byte alphabet, so every
    id decodes)."""
    (folder / "bert-base-cased").mkdir()
    (folder / "gpt2").mkdir()
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces += [f"piece{i}" for i in range(BERT_VOCAB - len(pieces))]
    (folder / "bert-base-cased" / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    alphabet += [chr(256 + i) for i in range(256 - len(alphabet))]
    tokens = alphabet + [a + b for a in alphabet for b in alphabet][: GPT2_BPE_VOCAB - len(alphabet)]
    (folder / "gpt2" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "gpt2" / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return find_optimus_tokenizers(folder)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Fill every parameter: matrices and kernels N(0, 1/fan_in), norm weights 1, other vectors 0
    (activations stay of order 1 through the full-size stacks, in any dtype)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, (parameter.numel() // parameter.shape[0]) ** -0.5)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return module.requires_grad_(False).eval()


def random_models(flow: str, device: torch.device, dtype: torch.dtype, tokenizer_dir: Path) -> VDModels:
    """The full-size VD parts ``flow`` needs, with random weights, made directly on ``device``."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    needs = FLOW_NEEDS[flow]
    with torch.device("meta"):
        diffuser = FourFlowDiffuser(DiffuserConfig.full_size(), diffuser_parts_for(needs.data_kinds, needs.context_kinds))
    diffuser = diffuser.to(dtype).to_empty(device=device)  # the diffuser has no buffers to keep
    text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    towers = clip_towers_for(needs.context_kinds)
    models = VDModels(diffuser=randomize_(diffuser))
    with torch.device(device):
        models.clip = randomize_(CLIPContextEncoder(text if "text" in towers else None,
                                                    vision if "vision" in towers else None, 768,
                                                    tokenizer=StandInCLIPTokenizer()).to(dtype))
        if needs.image_vae:
            models.image_vae = randomize_(
                ImageVAE(ImageVAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4))
            )
        if needs.optimus:
            models.optimus = randomize_(OptimusVAE(
                BertEncoderConfig(BERT_VOCAB, 768, 12, 12, 3072, 512, 2, 768),
                GPT2DecoderConfig(GPT2_BPE_VOCAB + 3, 768, 12, 12, 1024, 3072, 768),
                stand_in_optimus_tokenizers(tokenizer_dir),
            ))
    return models


class StepClock:
    """Times the sampler loop inside a flow through ``SamplingOptions``' hooks: ``cancel`` is
    checked before every step, ``callback`` runs after every step, so the loop lasts from the
    first ``cancel`` to the last ``callback`` of a run. Call :meth:`start_run` before each run;
    ``sampling_ms`` holds one figure per finished run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sampling_ms: list[float] = []
        self._first: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued work belongs to the part before
        return time.perf_counter()

    def start_run(self) -> None:
        self._first = None

    def cancel(self) -> bool:
        if self._first is None:
            self._first = self._now()
        return False

    def callback(self, step: int, total: int, x, x0_estimate) -> None:
        if step == total - 1:
            if self._first is None:
                raise RuntimeError("StepClock: the sampler ran a step without checking cancel first")
            self.sampling_ms.append((self._now() - self._first) * 1000)

    def options(self, steps: int) -> SamplingOptions:
        return SamplingOptions(steps=steps, callback=self.callback, cancel=self.cancel)


def flow_line(name: str, device, dtype, size: int, n: int, steps: int, timing, clock: StepClock,
              fast_paths: dict) -> dict:
    """One JSON line: the whole flow's spread, the sampler loop's, and the per-step figure."""
    sampling = spread(clock.sampling_ms, prefix="sampling_")
    return {"bench": name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "width": size, "height": size, "n": n, "steps": steps, **timing.fields(), **sampling,
            "seconds": round(timing.median_ms / 1000, 3),
            "seconds_per_step": round(sampling["sampling_median_ms"] / 1000 / steps, 4),
            "peak_mem_mb": round(timing.peak_mem_mb), "fast_paths": fast_paths}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="256×256, 4 steps, 1 image, 2 captions")
    parser.add_argument("--channels-last", action="store_true", help="NHWC diffuser convolutions")
    parser.add_argument("--compile", action="store_true", help="torch.compile the diffuser")
    parser.add_argument("--cache-dir", help="persistent Inductor cache directory for --compile")
    parser.add_argument("--cuda-graphs", action="store_true", help="record each diffuser forward once, replay it")
    parser.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS), help="flows to time")
    parser.add_argument("--repeats", type=int, help="timed runs of each flow (default 3, --quick 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timings on a shared machine)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    size, steps, images, captions = (256, 4, 1, 2) if args.quick else (512, 50, 2, 4)
    fast_paths = {"channels_last": args.channels_last, "compile": args.compile, "cuda_graphs": args.cuda_graphs}

    picture = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    flows = {
        "text_to_image": (images, lambda m, n, o: text_to_image(m, "a red car", width=size, height=size, n=n,
                                                                options=o)),
        "image_to_text": (captions, lambda m, n, o: image_to_text(m, picture, n=n, options=o)),
        "dual_context": (images, lambda m, n, o: dual_context(m, "a red car", picture, text_strength=0.5, n=n,
                                                              width=size, height=size, options=o)),
    }
    for name in args.flows:
        n, flow = flows[name]
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            models = random_models(name, device, dtype, Path(tokenizer_dir))
        if any(fast_paths.values()):
            models.diffuser = accelerate_diffuser(models.diffuser, cache_dir=args.cache_dir, **fast_paths)
        flow(models, n, SamplingOptions(steps=2))  # warm-up: kernels, allocator, cuDNN choices, graphs
        clock = StepClock(device)

        def timed_run(flow=flow, models=models, n=n, clock=clock):
            clock.start_run()
            return flow(models, n, clock.options(steps))

        timing = measure(timed_run, device, repeats, warmup=0)
        print(json.dumps(flow_line(name, device, dtype, size, n, steps, timing, clock, fast_paths)), flush=True)
        models = timed_run = timing = None  # free this flow's parts before the next one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
