"""Building blocks of ``test_comfy_ecosystem.py``: sampling helpers, sizes read from the model, and
the LoRA, ControlNet and model patches the tests apply (all made by the tests, for the model's sizes).

Needs ComfyUI importable (the test module's ``comfy`` fixture sets it up); ComfyUI modules are
imported inside the functions.
"""

from __future__ import annotations

import importlib

import torch

DIFFUSER = "vd-four-flow-v1-0-fp16.pth"
CLIP = "clip-vit-large-patch14"
STEPS = 4  # few steps: every feature below acts at every step
CFG = 7.5
SEED = 7


def load_model(nodes, image_model="text", diffuser=DIFFUSER):
    with torch.inference_mode():
        return nodes["VDLoader"].load(diffuser, image_model, "none", "none", "none", "none", "fp32")[0]


def downsampling(model) -> int:
    """Pixels per latent cell at the UNet's deepest level (8 × 2^(levels − 1))."""
    return 8 * 2 ** (len(model.model.model_config.unet_config["channel_mult"]) - 1)


def sizes(model, cells: int = 4) -> tuple[int, int]:
    """(width, height) in pixels giving ``cells`` × ``cells − 1`` cells at the deepest level (not
    square, so a transposed layout would show)."""
    return downsampling(model) * cells, downsampling(model) * (cells - 1)


def vd_sample(vd, model, context, width, height, seed=SEED):
    """VD Text to Image (the exact official DDIM) on ``model``: unscaled latents (1, 4, h, w)."""
    with torch.inference_mode():
        (latent,) = vd.nodes["VDTextToImage"].sample(model, context, seed, STEPS, CFG, "ddim", "uniform", 0.0,
                                                     width, height, 1)
    return latent["samples"]


def ksample(comfy, model, positive, negative, width, height, seed=SEED):
    """Core KSampler (ddim / ddim_uniform) on ``model``."""
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
        (out,) = comfy.nodes.common_ksampler(model, seed, STEPS, CFG, "ddim", "ddim_uniform", positive, negative,
                                             latent)
    return out["samples"]


def conditioning(vd, context):
    return vd.nodes["VDContextToConditioning"].convert(context)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_changed(patched, plain, what):
    """The patch must move the output by a visible amount (not rounding noise)."""
    change = max_diff(patched, plain)
    assert change > 1e-3 * max(1.0, plain.abs().max().item()), f"{what}: output unchanged (max|Δ| = {change:.2e})"
    return change


# SD 1.x UNet module names in the LoRA key styles ComfyUI reads (comfy/lora.py model_lora_keys_unet)
# → ComfyUI's native (ldm) weight names, and the file's (down, up) suffixes. These are SD 1.x's fixed
# correspondences (down_blocks.0 = level 0 = input_blocks 1–2, mid_block = middle_block), not sizes.
KOHYA = (".lora_down.weight", ".lora_up.weight")  # + ".alpha" (scale alpha / rank)
DIFFUSERS = ("_lora.down.weight", "_lora.up.weight")  # diffusers' attention-processor LoRAs (scale 1)
PEFT = (".lora_A.weight", ".lora_B.weight")  # diffusers/PEFT (scale 1)
LORA_TARGETS = {
    "kohya": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
            ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", KOHYA),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v":
            ("input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", KOHYA),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
            ("middle_block.1.transformer_blocks.0.attn2.to_k.weight", KOHYA),
        "lora_unet_down_blocks_0_resnets_0_conv1": ("input_blocks.1.0.in_layers.2.weight", KOHYA),
    },
    "diffusers": {
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_k":
            ("input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", DIFFUSERS),
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_v":
            ("input_blocks.2.1.transformer_blocks.0.attn2.to_v.weight", DIFFUSERS),
        "unet.down_blocks.0.resnets.1.conv2": ("input_blocks.2.0.out_layers.3.weight", PEFT),
    },
}
LORA_STRENGTH = 0.8


def make_lora(model, style: str, rank: int = 2, seed: int = 0):
    """An SD 1.5-format LoRA for ``model``'s sizes: ``(file tensors, {native weight name: merged delta})``.

    Each target gets ``down`` (r, in[, kh, kw]) and ``up`` (out, r[, 1, 1]); kohya files also carry
    ``.alpha`` (scale alpha / r, here 1/2), the others scale 1. The delta, ``strength · scale · up @ down``
    reshaped to the weight, is computed here independently of ComfyUI.
    """
    generator = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    tensors, deltas = {}, {}
    for name, (native, (down_suffix, up_suffix)) in LORA_TARGETS[style].items():
        weight = unet.get_parameter(native)
        out_ch, in_ch, *kernel = weight.shape
        down = torch.randn(rank, in_ch, *kernel, generator=generator) * 0.3
        up = torch.randn(out_ch, rank, *([1] * len(kernel)), generator=generator) * 0.3
        tensors |= {name + down_suffix: down, name + up_suffix: up}
        scale = 1.0
        if down_suffix == KOHYA[0]:
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
            scale = 0.5
        delta = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
        deltas[native] = (LORA_STRENGTH * scale) * delta
    return tensors, deltas


def save_lora(comfy, tensors, name):
    from safetensors.torch import save_file

    save_file(tensors, str(comfy.work / "loras" / name))
    return name


def merged_copy(vd, deltas, image_model="text"):
    """A second MODEL from the same file with ``deltas`` added into its weights."""
    model = load_model(vd.nodes, image_model)
    with torch.inference_mode():  # the loader made inference tensors (as ComfyUI's executor does)
        for native, delta in deltas.items():
            model.model.diffusion_model.get_parameter(native).add_(delta.to(torch.float32))
    return model


# SD 1.5's UNet (public architecture facts, as ComfyUI's SD15 model config builds it).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def config_heads() -> int:
    return importlib.import_module("vd_pack.vd_core.diffuser.config").RELEASE_NUM_HEADS


def _freelunch(name):
    def patch(model, _size):
        node = getattr(importlib.import_module("comfy_extras.nodes_freelunch"), name)()
        return node.patch(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]

    return patch


def _sag(model, _size):
    return importlib.import_module("comfy_extras.nodes_sag").SelfAttentionGuidance.execute(model, 0.5, 2.0)[0]


def _pag(model, _size):
    return importlib.import_module("comfy_extras.nodes_pag").PerturbedAttentionGuidance.execute(model, 3.0)[0]


def _hypertile(model, size):
    """HyperTile with tiles of half the latent width (swap_size 1: no random choice), so the
    full-resolution self-attention splits in two."""
    latent_width = size[0] // 8
    assert latent_width % 2 == 0 and latent_width // 2 >= 4, "pick a size HyperTile tiles (≥ 32 px tiles)"
    tile_size = 8 * (latent_width // 2)
    return importlib.import_module("comfy_extras.nodes_hypertile").HyperTile.execute(model, tile_size, 1, 0, False)[0]


PATCHES = {"FreeU": _freelunch("FreeU"), "FreeU_V2": _freelunch("FreeU_V2"), "SAG": _sag, "PAG": _pag,
           "HyperTile": _hypertile}


def make_controlnet(model, seed: int = 0):
    """A tiny SD 1.5-architecture ControlNet for ``model``'s sizes, as core ControlNet.

    Core's ``cldm.ControlNet`` is built with the UNet's config and wrapped as
    ``comfy.controlnet.load_controlnet_state_dict`` does after detecting a file's config (its
    detector knows only real SD sizes; a full-size VD UNet and SD 1.5 ControlNets detect as SD15).
    The state dict copies the UNet's time MLP, input and middle blocks, as ControlNet training
    starts; the hint encoder and the zero convolutions get small random values (trained ones are nonzero).
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device=mm.unet_offload_device(),
                                               operations=comfy.ops.disable_weight_init)
    unet = model.model.diffusion_model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    state, copied = {}, 0
    for key, like in control_model.state_dict().items():
        if key in unet:
            state[key] = unet[key].detach().clone().float()
            copied += 1
        else:
            state[key] = torch.randn(like.shape, generator=generator) * 0.05
    assert copied and any(k.startswith("zero_convs.") for k in state)
    control_model.load_state_dict(state, strict=True)
    return comfy.controlnet.ControlNet(control_model, load_device=mm.get_torch_device())


def vd_sample_conditioning(vd, model, positive, negative, width, height, seed=SEED):
    """VD Text to Image (exact DDIM) on a core CONDITIONING pair (its optional positive/negative)."""
    node = vd.nodes["VDTextToImage"]
    with torch.inference_mode():
        (latent,) = node.sample(model, vd.text, seed, STEPS, CFG, "ddim", "uniform", 0.0, width, height, 1,
                                positive=positive, negative=negative)
    return latent["samples"]


def count_transformer_blocks(model) -> int:
    from comfy.ldm.modules.attention import BasicTransformerBlock

    return sum(isinstance(m, BasicTransformerBlock) for n, m in model.model.diffusion_model.named_modules()
               if ".secondary." not in n)


