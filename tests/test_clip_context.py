"""CLIP text/image contexts (algorithm.md §5), their preprocessing, loading and the tokenizer look-up.

Expected values come from the official code's outputs in ``tiny/`` and ``tiny_release/expected/``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_close_ref, load_tensors, release_config
from vd_core.clip import CLIPContextEncoder, encoder_from_state_dict, load_clip, load_clip_tokenizer
from vd_core.clip.preprocess import CLIPImagePreprocessing, mask_token_weights, resize_and_crop, to_uint8
from vd_core.errors import CheckpointError, MissingPartError, TokenizerNotFoundError, VDInputError

REL = 1e-4  # README: single forward passes within 1e-4·max(1, max|ref|)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline_empty_hf_cache(tmp_path_factory, monkeypatch):
    """No test may find (or download) anything from a real Hugging Face cache."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    return cache / "hub"


@pytest.fixture(scope="module")
def tiny_clip_config(tiny_config):
    """The tiny CLIP hyper-parameters as a CLIPConfig-style dict (heads 2: not derivable from shapes)."""
    ctx = tiny_config["ctx"]
    return {"text_config": ctx["clip_text_config"], "vision_config": ctx["clip_vision_config"]}


@pytest.fixture(scope="module")
def tiny_clip(tiny_dir, tiny_clip_config):
    """The tiny CLIP read from the VD all-in-one file (``ctx.text.model.*`` / ``ctx.image.model.*``)."""
    return load_clip(tiny_dir / "weights.safetensors", tokenizer=None, config=tiny_clip_config)


@pytest.fixture(scope="module")
def tiny_expected(tiny_dir):
    return load_tensors(tiny_dir / "clip.safetensors")


@pytest.fixture(scope="module")
def release_clip_dir(release_dir):
    return release_dir / "clip-vit-large-patch14"


@pytest.fixture(scope="module")
def release_clip(release_clip_dir):
    return load_clip(release_clip_dir)


@pytest.fixture(scope="module")
def release_expected(release_dir):
    expected = load_tensors(release_dir / "expected" / "clip.safetensors")
    expected.update(json.loads((release_dir / "expected" / "clip.json").read_text()))
    return expected


@pytest.fixture(scope="module")
def release_images(release_dir):
    """image_0.png (square) and image_1.png (not square) as (1, 3, H, W) floats in [0, 1]."""
    images = []
    count = len(load_tensors(release_dir / "expected" / "clip.safetensors")["image_ctx"])
    for i in range(count):
        pixels = np.asarray(Image.open(release_dir / "expected" / f"image_{i}.png").convert("RGB"))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
    return images


@pytest.fixture(scope="module")
def release_state(release_clip_dir):
    return load_tensors(release_clip_dir / "model.safetensors")


# ---------------------------------------------------------------------------------- tiny/ fixture parity


def test_text_context_matches_official(tiny_clip, tiny_inputs, tiny_expected):
    err = assert_close_ref(tiny_clip.encode_text_ids(tiny_inputs["clip_token_ids"]), tiny_expected["text_ctx"],
                           REL, "text_ctx")
    err_empty = assert_close_ref(tiny_clip.encode_text_ids(tiny_inputs["clip_token_ids_empty"]),
                                 tiny_expected["text_ctx_empty"], REL, "text_ctx_empty")
    assert max(err, err_empty) < 1e-5


def test_uint8_preprocessing_is_bit_exact(tiny_clip, tiny_inputs, tiny_expected):
    settings = tiny_clip.preprocessing
    assert torch.equal(to_uint8(tiny_inputs["pixels_sq"]), tiny_inputs["pixels_sq_u8"])
    # algorithm.md §5.2 step 1: ToPILImage truncates (no rounding).
    assert to_uint8(torch.tensor([0.7, 1.5, 254.9, 255.0]) / 255).tolist() == [0, 1, 254, 255]
    for pixels, key in (("pixels_sq", "image_processed_u8"), ("pixels_rect", "image_processed_u8_rect")):
        processed = resize_and_crop(to_uint8(tiny_inputs[pixels]), settings).permute(0, 2, 3, 1)
        assert torch.equal(processed, tiny_expected[key]), key


@pytest.mark.parametrize("pixels, key", [("pixels_sq", "image_ctx"), ("pixels_rect", "image_ctx_rect")])
def test_image_context_matches_official(tiny_clip, tiny_inputs, tiny_expected, pixels, key):
    assert assert_close_ref(tiny_clip.encode_image(tiny_inputs[pixels]), tiny_expected[key], REL, key) < 1e-5


def test_black_image_context(tiny_clip, tiny_inputs, tiny_expected):
    black = torch.zeros_like(tiny_inputs["pixels_sq"][:1])
    assert_close_ref(tiny_clip.encode_image(black), tiny_expected["image_ctx_black"], REL, "black")


def test_masked_image_context_matches_official(tiny_clip, tiny_inputs, tiny_expected):
    masked = tiny_clip.encode_image(tiny_inputs["pixels_sq"], tiny_inputs["mask_sq"])
    assert assert_close_ref(masked, tiny_expected["image_ctx_masked"], REL, "image_ctx_masked") < 1e-5
    assert not torch.allclose(masked, tiny_expected["image_ctx"], atol=1e-3)  # the mask did something


def test_all_ones_mask_is_the_unmasked_path(tiny_clip, tiny_inputs, tiny_expected):
    ones = tiny_clip.encode_image(tiny_inputs["pixels_sq"], torch.ones_like(tiny_inputs["mask_sq"]))
    assert torch.equal(ones, tiny_clip.encode_image(tiny_inputs["pixels_sq"]))
    assert_close_ref(ones, tiny_expected["image_ctx_mask_all_ones"], REL, "all-ones mask")
    # A mask of another size than the image is resized (here: all ones at half size → still unmasked).
    height, width = tiny_inputs["pixels_sq"].shape[-2:]
    half = torch.ones(1, 1, max(1, height // 2), max(1, width // 2))
    assert torch.equal(tiny_clip.encode_image(tiny_inputs["pixels_sq"], half), ones)


def test_one_mask_broadcasts_to_the_batch(tiny_clip, tiny_inputs, tiny_expected):
    pixels, mask0 = tiny_inputs["pixels_sq"], tiny_inputs["mask_sq"][:1]
    both = tiny_clip.encode_image(pixels, mask0)
    assert_close_ref(both[:1], tiny_expected["image_ctx_masked"][:1], REL, "broadcast mask, image 0")
    assert_close_ref(both[1:], tiny_clip.encode_image(pixels[1:], mask0), 1e-6, "broadcast mask, image 1")
    # (B, H, W) masks, ComfyUI's layout, are read as (B, 1, H, W).
    assert torch.equal(tiny_clip.encode_image(pixels, tiny_inputs["mask_sq"][:, 0]),
                       tiny_clip.encode_image(pixels, tiny_inputs["mask_sq"]))


def test_mask_token_weights_from_a_half_mask():
    # 448 px, left half kept: bilinear halving is exact, so patch columns 0-7 keep, 8-15 remove.
    mask = torch.zeros(1, 1, 448, 448)
    mask[..., :224] = 1
    weights = mask_token_weights(mask, image_size=224, patch_size=14)
    assert weights.shape == (1, 257, 1)
    assert weights[0, 0, 0].item() == 0.5  # class token: mean of the whole mask
    grid = weights[0, 1:, 0].view(16, 16)
    assert torch.equal(grid[:, :8], torch.ones(16, 8)) and torch.equal(grid[:, 8:], torch.zeros(16, 8))
    assert mask_token_weights(torch.ones(2, 1, 50, 70), 224, 14) is None


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(tiny_dir, tiny_clip_config, tiny_inputs, tiny_expected, dtype, rel):
    clip = load_clip(tiny_dir / "weights.safetensors", tokenizer=None, config=tiny_clip_config, dtype=dtype)
    text = clip.encode_text_ids(tiny_inputs["clip_token_ids"])
    image = clip.encode_image(tiny_inputs["pixels_sq"], tiny_inputs["mask_sq"])
    assert text.dtype == image.dtype == dtype
    assert_close_ref(text, tiny_expected["text_ctx"], rel, f"text {dtype}")
    assert_close_ref(image, tiny_expected["image_ctx_masked"], rel, f"masked image {dtype}")


# ---------------------------------------------------------------------- tiny_release/: real folder layout


@pytest.fixture(scope="module")
def release_ctx(release_dir) -> dict:
    """The miniature's CLIP settings (``expected/config.json["tiny"]["ctx"]``): ids, widths, lengths."""
    return release_config(release_dir)["ctx"]


def test_release_tokenizer_ids(release_clip, release_expected, release_ctx, caplog):
    with caplog.at_level(logging.WARNING, logger="vd_core.clip.context"):
        ids = release_clip.tokenize(release_expected["prompts"])
    assert torch.equal(ids, release_expected["text_input_ids"])
    eos = release_ctx["tiny_eos_id"]
    # A prompt cut at the context length ends with <|endoftext|> at the last position and has no padding.
    truncated = [i for i, row in enumerate(ids.tolist()) if row.count(eos) == 1 and row[-1] == eos]
    assert truncated, "the fixture's prompts include one long enough to be truncated"
    for i in range(len(release_expected["prompts"])):
        assert (f"prompt {i} has" in caplog.text) == (i in truncated), i
    assert torch.equal(release_clip.tokenize([""]), release_expected["text_input_ids_empty"])


def test_release_text_context(release_clip, release_expected):
    assert_close_ref(release_clip.encode_text(release_expected["prompts"]), release_expected["text_ctx"], REL, "text")
    assert_close_ref(release_clip.encode_text(""), release_expected["text_ctx_empty"], REL, "empty prompt")


def test_release_image_context(release_clip, release_images, release_expected):
    for i, image in enumerate(release_images):  # image_1 is not square: resized, then centre-cropped
        processed = resize_and_crop(to_uint8(image), release_clip.preprocessing).permute(0, 2, 3, 1)
        assert torch.equal(processed[0], release_expected["image_processed_u8"][i])
        assert_close_ref(release_clip.encode_image(image), release_expected["image_ctx"][i:i + 1], REL, f"image {i}")
    black = torch.zeros_like(release_images[0])
    assert_close_ref(release_clip.encode_image(black), release_expected["image_ctx_black"], REL, "black")


def test_release_preprocessor_config_is_read(release_clip_dir):
    settings = CLIPImagePreprocessing.from_file(release_clip_dir / "preprocessor_config.json")
    assert settings == CLIPImagePreprocessing.openai(224)


def test_preprocessor_config_layouts(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    settings = CLIPImagePreprocessing.from_file(path)
    assert (settings.shortest_edge, settings.crop_size, settings.mean) == (256, 224, (0.5, 0.5, 0.5))
    path.write_text(json.dumps({"crop_size": {"height": 224, "width": 300}}))
    with pytest.raises(CheckpointError, match="preprocessor"):
        CLIPImagePreprocessing.from_file(path)


def test_vision_only_state_dict(release_state, release_clip_dir, release_images, release_expected):
    """What the ComfyUI node does with a CLIP_VISION model's weights."""
    vision = {k: v for k, v in release_state.items() if k.startswith(("vision_model.", "visual_projection."))}
    config = json.loads((release_clip_dir / "config.json").read_text())
    clip = encoder_from_state_dict(vision, config)
    assert clip.text_model is None and clip.context_dim == release_expected["image_ctx"].shape[-1]
    assert_close_ref(clip.encode_image(release_images[0]), release_expected["image_ctx"][:1], REL, "vision only")
    vision["visual_projection.weight"].zero_()  # the encoder holds its own copy
    assert clip.visual_projection.weight.abs().sum() > 0
    with pytest.raises(MissingPartError, match="text tower"):
        clip.encode_text_ids(torch.zeros(1, 77, dtype=torch.long))


def test_single_file_and_towers(release_state, release_clip_dir, release_expected, release_ctx, tmp_path):
    config = json.loads((release_clip_dir / "config.json").read_text())
    path = tmp_path / "clip.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in release_state.items()}, path)
    clip = load_clip(path, tokenizer=None, towers=("text",), config=config)
    assert clip.vision_model is None and clip.dtype == torch.float16  # dtype=None keeps the file's
    ctx = clip.encode_text_ids(release_expected["text_input_ids"])
    assert_close_ref(ctx, release_expected["text_ctx"], 5e-3, "fp16 file")
    with pytest.raises(MissingPartError, match="no tokenizer"):
        clip.encode_text(["a cat"])
    with pytest.raises(MissingPartError, match="vision tower"):
        clip.encode_image(torch.zeros(1, 3, 8, 8))
    # Without config.json heads are 64 wide; a tower whose width is no multiple of 64 needs a config.
    widths = [release_ctx[f"clip_{kind}_config"]["hidden_size"] for kind in ("text", "vision")]
    if any(width % 64 for width in widths):
        with pytest.raises(CheckpointError, match="attention heads"):
            load_clip(path, tokenizer=None)


def test_folder_with_pytorch_model_bin(release_state, release_clip_dir, release_expected, tmp_path):
    for name in ("config.json", "preprocessor_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((release_clip_dir / name).read_bytes())
    torch.save(release_state, tmp_path / "pytorch_model.bin")
    clip = load_clip(tmp_path, towers=("text",))
    assert_close_ref(clip.encode_text(release_expected["prompts"][:2]), release_expected["text_ctx"][:2], REL, "bin")


def test_heads_default_to_64_wide(tmp_path):
    from transformers import CLIPTextConfig

    def build(heads):
        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=50, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=heads, max_position_embeddings=77, projection_dim=16)
        return CLIPContextEncoder(config, None, 16)

    path = tmp_path / "text.safetensors"
    save_file(build(2).state_dict(), str(path))
    ids = torch.randint(0, 49, (1, 77), generator=torch.Generator().manual_seed(0))
    loaded = load_clip(path, tokenizer=None, towers=("text",)).encode_text_ids(ids)
    assert torch.allclose(loaded, build(2).encode_text_ids(ids), atol=1e-6)
    assert not torch.allclose(loaded, build(4).encode_text_ids(ids), atol=1e-3)


# ---------------------------------------------------------------------------------------- bad files


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_text_encoder_without_projection_is_refused(release_state, tmp_path):
    sd1_text = {k: v for k, v in release_state.items() if k.startswith("text_model.")}
    with pytest.raises(CheckpointError, match="text_projection") as info:
        load_clip(_save(sd1_text, tmp_path / "clip_l.safetensors"), tokenizer=None, towers=("text",))
    assert "clip-vit-large-patch14" in str(info.value)
    no_head = {k: v for k, v in release_state.items() if k != "text_projection.weight"}
    with pytest.raises(CheckpointError, match="text_projection"):
        load_clip(_save(no_head, tmp_path / "no_head.safetensors"), tokenizer=None)


def test_missing_tower_unknown_and_missing_keys(release_state, tmp_path):
    vision = {k: v for k, v in release_state.items() if k.startswith(("vision_model.", "visual_projection."))}
    with pytest.raises(CheckpointError, match="no CLIP text tower"):
        load_clip(_save(vision, tmp_path / "vision.safetensors"), tokenizer=None)
    sd_checkpoint = {"cond_stage_model.transformer." + k: v for k, v in release_state.items()}
    with pytest.raises(CheckpointError, match="cond_stage_model"):
        load_clip(_save(sd_checkpoint, tmp_path / "sd.safetensors"), tokenizer=None)
    broken = {k: v for k, v in release_state.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match="layers.1.mlp.fc2.bias"):
        load_clip(_save(broken, tmp_path / "broken.safetensors"), tokenizer=None, towers=("vision",))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_clip(tmp_path)


# ---------------------------------------------------------------------------------------- bad inputs


def test_image_input_variants(tiny_clip, tiny_inputs):
    rgb = tiny_inputs["pixels_sq"][:1]
    reference = tiny_clip.encode_image(rgb)
    assert torch.equal(tiny_clip.encode_image(rgb[0]), reference)  # (3, H, W) gets a batch dim
    rgba = torch.cat([rgb, torch.rand_like(rgb[:, :1])], dim=1)
    assert torch.equal(tiny_clip.encode_image(rgba), reference)  # alpha dropped, not composited
    grey = rgb[:, :1]
    assert torch.equal(tiny_clip.encode_image(grey), tiny_clip.encode_image(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("images, message", [
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "255"),
    (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[0, 1\]"),
    (torch.rand(32, 32), r"\(B, 3, H, W\)"),
    (torch.rand(1, 1, 3, 32, 32), r"\(B, 3, H, W\)"),
    (torch.rand(1, 32, 32, 3), "permute"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    ("image.png", "torch.Tensor"),
])
def test_bad_images(tiny_clip, images, message):
    with pytest.raises(VDInputError, match=message):
        tiny_clip.encode_image(images)


@pytest.mark.parametrize("bad", ["one more mask than images", "dtype", "channels"])
def test_bad_masks(tiny_clip, tiny_inputs, bad):
    pixels = tiny_inputs["pixels_sq"]
    batch, _, height, width = pixels.shape
    masks, message = {
        "one more mask than images": (torch.ones(batch + 1, 1, height, width) * 0.5,
                                      f"{batch + 1} masks for {batch} images"),
        "dtype": (torch.ones(batch, 1, height, width, dtype=torch.uint8), "dtype"),
        "channels": (torch.ones(batch, 2, height, width), r"\(B, 1, H, W\)"),
    }[bad]
    with pytest.raises(VDInputError, match=message):
        tiny_clip.encode_image(pixels, masks)


def test_bad_prompts_and_ids(release_clip, release_ctx):
    for prompts in ([], [1, 2], [None]):
        with pytest.raises(VDInputError, match="list of strings"):
            release_clip.encode_text(prompts)
    length, vocab = release_ctx["max_length"], release_ctx["clip_text_config"]["vocab_size"]
    for ids, message in ((torch.zeros(1, length), "integer"), (torch.zeros(1, length - 1, dtype=torch.long), "shape"),
                         (torch.full((1, length), vocab), rf"\[0, {vocab}\)")):
        with pytest.raises(VDInputError, match=message):
            release_clip.encode_text_ids(ids)


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_search_order(release_clip_dir, release_expected, release_ctx, tmp_path):
    tokenizer = load_clip_tokenizer([None, tmp_path, release_clip_dir])
    ids = tokenizer(release_expected["prompts"][0])["input_ids"]
    assert ids == release_expected["text_input_ids"][0, :len(ids)].tolist()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == release_ctx["tiny_eos_id"]


def test_tokenizer_not_found(tmp_path, release_state):
    with pytest.raises(TokenizerNotFoundError, match="vocab.json and merges.txt") as info:
        load_clip_tokenizer([tmp_path])
    assert str(tmp_path) in str(info.value)
    # tokenizer="auto" looks next to a single file and fails loudly when nothing is there.
    text = {k: v for k, v in release_state.items() if k.startswith(("text_model.", "text_projection."))}
    with pytest.raises(TokenizerNotFoundError):
        load_clip(_save(text, tmp_path / "clip.safetensors"), towers=("text",), config={"text_config": {
            "num_attention_heads": 4}})


def test_unreadable_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_clip_tokenizer(tmp_path)


def test_tokenizer_from_hf_cache(release_clip_dir, release_expected, offline_empty_hf_cache, tmp_path):
    snapshot = offline_empty_hf_cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (snapshot / name).write_bytes((release_clip_dir / name).read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    tokenizer = load_clip_tokenizer([tmp_path])
    # Prompt 0's first three BPE tokens after BOS (clip.json), tokenised alone.
    words = " ".join(token.removesuffix("</w>") for token in release_expected["tokens"][0][1:4])
    expected = release_expected["text_input_ids"][0, :4].tolist() + [tokenizer.eos_token_id]
    assert tokenizer(words)["input_ids"] == expected
