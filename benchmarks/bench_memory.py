"""Bytes of weights each VD flow puts on the compute device, full size, before and after loading
only the parts a graph uses (issue 11): one JSON line per flow and dtype.

    python benchmarks/bench_memory.py [--config vd-four-flow-v1-0.config.json] [--dtypes fp16 fp32]

Every part is built on the meta device (no memory is taken, nothing is read) from the official
resolved config (``$VD_REFERENCE_DIR/vd-four-flow-v1-0.config.json``: the diffuser's
``diffuser_cfg_list``, the CLIP hyper-parameters, Optimus' BERT/GPT-2 configs and the kl-f8
``ddconfig``) with the pack's own modules, and its parameters are counted (a tied matrix once;
buffers are not weights and are left out).

* **before**: what the old VD Loader put on the device for any graph: the whole four-flow
  diffuser (time embedding, both data kinds, both context kinds) and both CLIP towers;
* **after**: only the flow's parts (``vd_core.models.FLOW_NEEDS``): the shared time embedding, the
  data layers of the flow's data kind(s), the context layers of its context kind(s), and only the
  CLIP tower(s) those contexts come from (text→image: text tower; variation and image→text:
  vision tower).

Both sides add the image VAE and Optimus when the flow needs them (they were and are loaded only
when picked). Every part is counted in the line's dtype. ``multi_context`` needs what
``dual_context`` needs; ``edit_image_with_text`` is I2T2I (both data and context kinds).

Each line: ``{"bench": "weights_on_device", "flow", "dtype", "device": "meta", "before_bytes",
"after_bytes", "saved_bytes", "before_params", "after_params", "parts_before", "parts_after"}``
(``parts_*``: the part names counted, see :data:`PARTS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # as a script; never reorder a test's path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vd_core.clip import CLIPContextEncoder  # noqa: E402
from vd_core.diffuser import DiffuserConfig, DiffuserParts, FourFlowDiffuser  # noqa: E402
from vd_core.image_vae import ImageVAE, ImageVAEConfig  # noqa: E402
from vd_core.models import FLOW_NEEDS, clip_towers_for, diffuser_parts_for  # noqa: E402
from vd_core.optimus.bert_encoder import BertEncoderConfig, BertLatentEncoder  # noqa: E402
from vd_core.optimus.gpt2_decoder import GPT2DecoderConfig, GPT2LatentDecoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = "vd-four-flow-v1-0.config.json"
BYTES_PER_ELEMENT = {"fp16": 2, "bf16": 2, "fp32": 4}
# Part name -> the FourFlowDiffuser submodule it is (diffuser parts) or what builds it.
DIFFUSER_PARTS = {
    "time_embed": "image.time_embed",
    "image_data": "image.data_blocks",
    "text_data": "text.data_blocks",
    "image_context": "image.context_blocks",
    "text_context": "text.context_blocks",
}
PARTS = (*DIFFUSER_PARTS, "clip_text", "clip_vision", "optimus", "image_vae")


def default_config() -> Path:
    reference = Path(os.environ.get("VD_REFERENCE_DIR", ROOT.parent / "shared" / "vd_reference"))
    return reference / CONFIG_NAME


def diffuser_config(official: dict) -> DiffuserConfig:
    """The official ``diffuser_cfg_list`` (2-D image UNet + 0-D text UNet) as a ``DiffuserConfig``."""
    halves = {kind: cfg["args"] for kind, cfg in official["diffuser_cfg_list"]}
    image, text = halves["image"], halves["text"]
    levels = len(image["channel_mult"])
    return DiffuserConfig(
        model_channels=image["model_channels"],
        channel_mult=tuple(image["channel_mult"]),
        num_res_blocks=tuple(image["num_res_blocks"]),
        # attention_resolutions are downsampling factors 2**level of the levels with context layers
        context_levels=tuple(2**level in image["attention_resolutions"] for level in range(levels)),
        context_dim=image["context_dim"],
        in_channels=image["in_channels"],
        out_channels=image["out_channels"],
        text_latent_dim=text["input_channels"],
        second_dim=text["second_dim"][0],
        num_heads=image["num_heads"],
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


@lru_cache(maxsize=4)
def part_params(config_path: str) -> dict[str, int]:
    """Parameters of every part in :data:`PARTS`, from modules built on the meta device."""
    config = json.loads(Path(config_path).read_text())
    official = config["vd_four_flow_v1_0"]["args"]
    counts: dict[str, int] = {}
    with torch.device("meta"):
        diffuser = FourFlowDiffuser(diffuser_config(official), DiffuserParts.all())
        for part, name in DIFFUSER_PARTS.items():
            counts[part] = _count(diffuser.get_submodule(name))

        from transformers import CLIPTextConfig, CLIPVisionConfig

        clip = config["clip"]
        text = CLIPTextConfig(**clip["text_config"])
        vision = CLIPVisionConfig(**clip["vision_config"])
        counts["clip_text"] = _count(CLIPContextEncoder(text, None, clip["projection_dim"]))
        counts["clip_vision"] = _count(CLIPContextEncoder(None, vision, clip["projection_dim"]))

        vaes = dict(official["vae_cfg_list"])
        optimus = vaes["text"]["args"]
        bert = optimus["encoder"]["args"]["config"]
        gpt2 = optimus["decoder"]["args"]["config"]
        latent = optimus["args"]["latent_size"]
        encoder = BertLatentEncoder(BertEncoderConfig(
            bert["vocab_size"], bert["hidden_size"], bert["num_hidden_layers"], bert["num_attention_heads"],
            bert["intermediate_size"], bert["max_position_embeddings"], bert["type_vocab_size"], latent))
        decoder = GPT2LatentDecoder(GPT2DecoderConfig(
            gpt2["vocab_size"], gpt2["n_embd"], gpt2["n_layer"], gpt2["n_head"], gpt2["n_positions"],
            4 * gpt2["n_embd"], latent))  # GPT-2's MLP is 4 × n_embd wide (n_inner unset)
        counts["optimus"] = _count(nn.ModuleDict({"encoder": encoder, "decoder": decoder}))

        dd = vaes["image"]["args"]["ddconfig"]
        counts["image_vae"] = _count(ImageVAE(ImageVAEConfig(
            ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
            z_channels=dd["z_channels"], embed_dim=vaes["image"]["args"]["embed_dim"])))
    return counts


def _uses(used: DiffuserParts, part: str) -> bool:
    if part == "time_embed":
        return used.time_embed
    kind, role = part.split("_")
    return used.has_data(kind) if role == "data" else used.has_context(kind)


def flow_parts(flow: str) -> tuple[list[str], list[str]]:
    """``(before, after)``: the parts the old loader and the flow-aware loading put on the device."""
    needs = FLOW_NEEDS[flow]
    extras = (["optimus"] if needs.optimus else []) + (["image_vae"] if needs.image_vae else [])
    before = [*DIFFUSER_PARTS, "clip_text", "clip_vision", *extras]
    used = diffuser_parts_for(needs.data_kinds, needs.context_kinds)
    after = [part for part in DIFFUSER_PARTS if _uses(used, part)]
    after += [f"clip_{tower}" for tower in clip_towers_for(needs.context_kinds)] + extras
    return before, after


def lines(config_path: str | os.PathLike, dtypes=("fp16", "fp32")) -> list[dict]:
    counts = part_params(str(config_path))
    found = []
    for dtype in dtypes:
        size = BYTES_PER_ELEMENT[dtype]
        for flow in FLOW_NEEDS:
            before, after = flow_parts(flow)
            before_params, after_params = sum(counts[p] for p in before), sum(counts[p] for p in after)
            found.append({
                "bench": "weights_on_device", "flow": flow, "dtype": dtype, "device": "meta",
                "shape": None, "median_ms": None, "peak_mem_mb": None,
                "before_params": before_params, "after_params": after_params,
                "before_bytes": before_params * size, "after_bytes": after_params * size,
                "saved_bytes": (before_params - after_params) * size,
                "parts_before": before, "parts_after": after,
            })
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=default_config(), help=f"the official {CONFIG_NAME}")
    parser.add_argument("--dtypes", nargs="+", choices=BYTES_PER_ELEMENT, default=["fp16", "fp32"])
    parser.add_argument("--device", help="ignored (run_all passes it): every part is built on the meta device")
    parser.add_argument("--quick", action="store_true", help="ignored: counting is instant")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"{args.config} not found: pass --config or set VD_REFERENCE_DIR")
    for line in lines(args.config, args.dtypes):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
