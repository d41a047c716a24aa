"""The VD sampler nodes, inside ComfyUI, against the official 10-step DDIM runs on the release-layout
miniature (the image flows through the loader's core MODEL and ComfyUI's sampling).

The official runs draw the initial latent of a batch of 2 after ``torch.manual_seed(s)``; with
the nodes' per-item seeds, item 0 at seed ``s`` draws the same numbers (the first row of that
draw) and, at eta 0, the later per-step draws are multiplied by 0 (algorithm.md §7.2). So a node run of
batch 1 at seed ``s`` must reproduce the official item 0 (tolerances: vd_reference README, 10-step
trajectories 1e-3·max|ref| for image flows, 1e-2·max|ref| for text flows).
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_close_ref, dual_ratios, guidance_of
from node_fixtures import comfy_image, first_context

LATENT_SCALE = 0.18215  # algorithm.md §6.1: diffusion latents are kl-f8 latents × 0.18215
DDIM = {}  # the official runs' sampler settings (ddim.json), set by the autouse fixture below


@pytest.fixture(autouse=True)
def inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def contexts(nodes, parts, expected, release_dir):
    """Every prompt and image of the fixture through the VD context nodes."""
    found = {}
    with torch.inference_mode():
        for i, prompt in enumerate(expected["json"]["clip"]["prompts"]):
            found[f"prompt{i}"] = nodes["VDCLIPTextContext"].encode(parts[2], prompt, "")[0]
        for path in sorted((release_dir / "expected").glob("image_*.png")):
            found[path.stem.replace("_", "")] = nodes["VDCLIPImageContext"].encode(comfy_image(path), 0.5, 1.0,
                                                                                clip=parts[2])[0]
    return found


def case_context(contexts, expected, name: str):
    """The node context whose tokens are the official run's context ``name`` (ddim_contexts, e.g.
    ``t2i_c``): which prompt or image a case used is read off the tensors, not assumed."""
    official = expected["ddim_contexts"][name][:1]
    best = min(contexts, key=lambda k: (first_context((contexts[k],)).cond - official).abs().max().item()
               if first_context((contexts[k],)).cond.shape == official.shape else float("inf"))
    assert_close_ref(first_context((contexts[best],)).cond, official, 1e-4, f"{best} as {name}")
    return contexts[best]


def case_of(expected, case: str) -> dict:
    """A ddim.json case with its seed, conditional context names and settings."""
    info = expected["json"]["ddim"][case]
    return {**info, "cond": re.findall(r"\b(\w+_c)\b", info["description"]), "cfg": guidance_of(info, 7.5)}


@pytest.fixture(scope="module")
def latent_shape(expected):
    """(C, h, w) of the official image runs' latents (ddim.json), whose pixel size the tests use."""
    return tuple(expected["json"]["ddim"]["t2i"]["shape"][1:])


@pytest.fixture(autouse=True)
def _official_settings(latent_shape, expected):
    global WIDTH, HEIGHT
    HEIGHT, WIDTH = latent_shape[1] * 8, latent_shape[2] * 8
    t2i = case_of(expected, "t2i")
    DDIM.update(steps=t2i["steps"], cfg=t2i["cfg"], sampler="ddim", scheduler="uniform", eta=t2i["eta"])


def _image_latent(nodes, node_id, parts, context, seed, **kw):
    (latent,) = getattr(nodes[node_id], nodes[node_id].FUNCTION)(
        parts[0], context, seed, DDIM["steps"], DDIM["cfg"], DDIM["sampler"], DDIM["scheduler"], DDIM["eta"],
        kw.pop("width", WIDTH), kw.pop("height", HEIGHT), kw.pop("batch_size", 1), **kw)
    return latent


def test_text_to_image_matches_official(nodes, parts, contexts, expected, latent_shape):
    case = case_of(expected, "t2i")
    latent = _image_latent(nodes, "VDTextToImage", parts, case_context(contexts, expected, case["cond"][0]),
                           case["torch_seed"])
    samples = latent["samples"]
    assert set(latent) == {"samples"} and samples.shape == (1, *latent_shape)
    assert samples.dtype == torch.float32 and samples.device.type == "cpu"
    official = expected["ddim_t2i"]
    assert_close_ref(samples * LATENT_SCALE, official["x_final"][:1], 1e-3, "text→image latent")
    assert_close_ref(parts[4].decode(samples), official["images"][:1].permute(0, 2, 3, 1), 1e-3, "decoded image")


def test_image_variation_matches_official(nodes, parts, contexts, expected):
    case = case_of(expected, "i2i")
    latent = _image_latent(nodes, "VDImageVariation", parts, case_context(contexts, expected, case["cond"][0]),
                           case["torch_seed"])
    assert_close_ref(latent["samples"] * LATENT_SCALE, expected["ddim_i2i"]["x_final"][:1], 1e-3, "image variation")


def test_dual_context_matches_official(nodes, parts, contexts, expected):
    case = case_of(expected, "dual")
    text_ratio, image_ratio = dual_ratios(case["description"])
    text, image = (case_context(contexts, expected, name) for name in case["cond"])
    (mixed,) = nodes["VDDualContextMixer"].mix(text, text_ratio, image, image_ratio)
    latent = _image_latent(nodes, "VDTextToImage", parts, mixed, case["torch_seed"])
    assert_close_ref(latent["samples"] * LATENT_SCALE, expected["ddim_dual"]["x_final"][:1], 1e-3, "dual context")


@pytest.mark.parametrize("node_id, case", [("VDImageToText", "i2t"), ("VDTextVariation", "t2t")])
def test_text_flows_match_official(nodes, parts, contexts, expected, node_id, case):
    info = case_of(expected, case)
    settings = (info["steps"], info["cfg"], "ddim", "uniform", info["eta"])
    context = case_context(contexts, expected, info["cond"][0])
    (latents,) = nodes[node_id].sample(parts[1], context, info["torch_seed"], *settings, 1)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    assert_close_ref(latents, expected[f"ddim_{case}"]["x_final"][:1], 1e-2, case)


def test_batch_items_use_seed_plus_batch_index(nodes, parts, contexts, latent_shape):
    context = contexts["prompt0"]
    batch = _image_latent(nodes, "VDTextToImage", parts, context, 5, batch_size=2)["samples"]
    assert batch.shape == (2, *latent_shape) and not torch.allclose(batch[0], batch[1])
    alone = _image_latent(nodes, "VDTextToImage", parts, context, 6)["samples"]
    assert_close_ref(alone, batch[1:], 1e-5, "item 1 vs a run with seed + 1")
    # A latent from Latent From Batch carries batch_index; the dict's other keys pass through.
    picked = {"samples": torch.zeros(1, *latent_shape), "batch_index": [1], "note": "kept"}
    out = _image_latent(nodes, "VDTextToImage", parts, context, 5, latent=picked, denoise=1.0)
    assert out["batch_index"] == [1] and out["note"] == "kept"
    assert_close_ref(out["samples"], batch[1:], 1e-5, "batch_index item")


def test_latent_sets_size_and_fidelity_one_returns_it(nodes, parts, contexts, pack, latent_shape):
    start = {"samples": torch.randn(2, latent_shape[0], 6, 10, generator=torch.Generator().manual_seed(0))}
    out = _image_latent(nodes, "VDImageVariation", parts, contexts["image0"], 1, latent=start, fidelity=1.0)
    assert out["samples"].shape == (2, latent_shape[0], 6, 10)  # the latent's size and batch, not the widgets'
    assert_close_ref(out["samples"], start["samples"], 1e-5, "fidelity 1 keeps the input")
    with pytest.raises(pack.vd_core.errors.VDInputError, match=r"^VD Image Variation: .*latent"):
        _image_latent(nodes, "VDImageVariation", parts, contexts["image0"], 1, fidelity=0.5)


def test_multi_context_joins_image_slots(nodes, parts, contexts, pack, latent_shape):
    join = pack.nodes.samplers.join_image_slots
    joined = join((contexts["image0"], None, contexts["image1"]), contexts["prompt0"], 0.4)
    assert [(c.kind, round(c.ratio, 6)) for c in joined] == [("text", 0.4), ("image", 0.6)]
    image = joined[1]
    tokens = first_context((contexts["image0"],)).cond.shape[1]  # per image (257 for ViT-L/14)
    assert image.cond.shape[1] == 2 * tokens and torch.count_nonzero(image.uncond) == 0
    assert torch.equal(image.cond[:, tokens:], first_context((contexts["image1"],)).cond)
    assert [c.kind for c in join((contexts["image0"],), contexts["prompt0"], 0.0)] == ["image"]
    with pytest.raises(pack.vd_core.errors.VDInputError, match="image contexts only"):
        join((contexts["prompt0"],), None, 0.0)
    (latent,) = nodes["VDMultiContextSampler"].sample(
        parts[0], contexts["image0"], 3, *DDIM.values(), WIDTH, HEIGHT, 2, 0.4, image_2=contexts["image1"],
        text=contexts["prompt0"])
    assert latent["samples"].shape == (2, *latent_shape) and torch.isfinite(latent["samples"]).all()


def test_sampler_failures_name_the_node(nodes, parts, contexts, pack, monkeypatch):
    errors = pack.vd_core.errors
    with pytest.raises(errors.MissingPartError, match=r"^VD Text to Image: .*image_model"):
        _image_latent(nodes, "VDTextToImage", [None], contexts["prompt0"], 1)
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    sd_unet = comfy.supported_models.SD15(dict(parts[0].model.model_config.unet_config))
    sd_model = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(sd_unet), "cpu", "cpu")  # e.g. Load Checkpoint
    with pytest.raises(errors.VDInputError, match=r"^VD Text to Image: this MODEL is not Versatile Diffusion's"):
        _image_latent(nodes, "VDTextToImage", [sd_model], contexts["prompt0"], 1)
    with pytest.raises(errors.MissingPartError, match=r"^VD Image to Text: .*text_model"):
        nodes["VDImageToText"].sample(None, contexts["image0"], 1, *DDIM.values(), 1)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pack.nodes.comfy_sampling, "sample_image_latent", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"^VD Text to Image: .*batch size or the resolution"):
        _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 1)


def test_cancel_stops_sampling(nodes, parts, contexts, pack, monkeypatch):
    import comfy.model_management as mm

    # A cancel reaches ComfyUI as its own "interrupted" exception, not as an error.
    monkeypatch.setattr(pack.nodes.comfy_bridge, "cancel_check", lambda: (lambda: True))
    with pytest.raises(mm.InterruptProcessingException):
        _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 1)


def test_noise_mask_keeps_the_masked_out_region(nodes, parts, contexts, latent_shape):
    """A LATENT's noise_mask is honoured as KSampler honours it: where it is 0 the input latent stays."""
    start = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(0))
    half = latent_shape[2] // 2
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., :, half * 8:] = 1.0  # redraw the right half only
    out = _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 3,
                        latent={"samples": start, "noise_mask": mask}, denoise=0.6)["samples"]
    assert torch.allclose(out[..., :half], start[..., :half], atol=1e-5)
    assert (out[..., half:] - start[..., half:]).abs().max() > 0.1


def test_any_multiple_of_eight(nodes, parts, contexts):
    """Sides that are multiples of 8 px but not of the UNet's total downsampling (e.g. 16:9) sample."""
    factor = 2 ** (len(parts[0].model.diffusion_model.channel_mult) - 1) * 8  # px per deepest-level cell
    width, height = 5 * factor + 8, 3 * factor - 8
    out = _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 1, width=width, height=height)
    assert out["samples"].shape[2:] == (height // 8, width // 8) and torch.isfinite(out["samples"]).all()


def test_speed_up_keeps_the_official_results(nodes, parts, contexts, expected, pack):
    """VD Speed Up on the CPU: the text samplers run the wrapped diffuser and still reproduce the
    official runs; a second Speed Up re-wraps the diffuser instead of stacking wrappers."""
    speed_up = nodes["VDSpeedUp"].speed_up
    (fast,) = speed_up(parts[1], True, False)
    accelerated = pack.vd_core.acceleration.AcceleratedDiffuser
    assert isinstance(fast.module, accelerated) and fast.module.diffuser is parts[1].module
    assert not fast.module.cuda_graphs and not fast.module.channels_last  # no GPU: plain computation
    (again,) = speed_up(fast, True, True)
    assert again.module.diffuser is parts[1].module
    i2t = case_of(expected, "i2t")
    context = case_context(contexts, expected, i2t["cond"][0])
    (latents,) = nodes["VDImageToText"].sample(fast, context, i2t["torch_seed"], *DDIM.values(), 1)
    assert_close_ref(latents, expected["ddim_i2t"]["x_final"][:1], 1e-2, "sped-up image→text")
    with pytest.raises(pack.vd_core.errors.MissingPartError, match=r"^VD Speed Up: .*text_model"):
        speed_up(None, True, False)


def test_text_flow_layers_stream_under_lowvram(nodes, parts, contexts, expected, monkeypatch):
    """Under --lowvram / --novram ComfyUI leaves weights on the offload device and each casting layer
    fetches its own (``comfy_cast_weights``): every layer of the text-flow diffuser must then take its
    weight through that path, and the result stay the official one."""
    import comfy.ops

    diffuser = parts[1].module
    layers = {id(m): m for m in diffuser.modules() if hasattr(m, "comfy_cast_weights")}
    assert layers and not parts[1].managed.full_load
    fetched, cast = set(), comfy.ops.cast_bias_weight

    def recording_cast(layer, *args, **kwargs):
        fetched.add(id(layer))
        return cast(layer, *args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", recording_cast)
    for layer in layers.values():
        layer.comfy_cast_weights = True
    try:
        i2t = case_of(expected, "i2t")
        context = case_context(contexts, expected, i2t["cond"][0])
        (latents,) = nodes["VDImageToText"].sample(parts[1], context, i2t["torch_seed"], *DDIM.values(), 1)
    finally:
        for layer in layers.values():
            del layer.comfy_cast_weights
    used = {i for i, m in layers.items() if not _unused_by_image_context(diffuser, m)}
    assert used <= fetched, f"{len(used - fetched)} layers read their weight directly"
    assert_close_ref(latents, expected["ddim_i2t"]["x_final"][:1], 1e-2, "image→text with streamed layers")


def _unused_by_image_context(diffuser, layer) -> bool:
    """Layers an image-context text-flow run never calls (the text-context layers)."""
    blocks = diffuser.text.context_blocks
    return blocks is not None and any(layer is m for m in blocks.modules())


def test_whole_seed_range_and_non_finite_latents(nodes, parts, contexts, pack, latent_shape):
    """ComfyUI's seed widget reaches 2⁶⁴−1: item 1 of a batch there wraps to seed 0; a latent with
    NaN is refused before sampling, naming the node."""
    top = pack.nodes.types.MAX_SEED
    batch = _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], top, batch_size=2)["samples"]
    wrapped = _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 0)["samples"]
    assert_close_ref(batch[1:], wrapped, 1e-5, "seed 2⁶⁴−1 + 1 wraps to 0")
    broken = torch.zeros(1, *latent_shape)
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(pack.vd_core.errors.VDInputError, match=r"^VD Text to Image: .*latent"):
        _image_latent(nodes, "VDTextToImage", parts, contexts["prompt0"], 1, latent={"samples": broken}, denoise=0.5)
