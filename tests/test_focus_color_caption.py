"""The WebUI's Focus (adjust_rank, algorithm.md §8.1), Simple colour adjustment (§8.2) and caption clean-up
(§8.3) against the official outputs in the tiny fixtures; plus the I2T2I low-rank tokens (§10)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close_ref, load_tensors

from vd_core.caption_cleanup import remove_duplicate_words
from vd_core.color_match import match_color_simple
from vd_core.errors import VDInputError
from vd_core.focus import adjust_rank, apply_focus, focus_multipliers, low_rank_tokens


@pytest.fixture(scope="module")
def rank_report(tiny_dir):
    return json.loads((tiny_dir / "adjust_rank.json").read_text())["report"]


@pytest.fixture(scope="module")
def rank_expected(tiny_dir):
    return load_tensors(tiny_dir / "adjust_rank.safetensors")


def _level_key(level: float) -> str:
    return "lvl_" + str(float(level)).replace(".", "p")  # 0.25 -> lvl_0p25, as in index.json


# --- focus -----------------------------------------------------------------------------------------

def test_adjust_rank_matches_official_every_level(rank_report, rank_expected, tiny_inputs):
    tokens = tiny_inputs["adjust_rank_ctx"]  # (2, 256, D); the official ran one sample per call
    for level in rank_report["levels"]:
        # the official randomized PCA differs from an exact SVD by ~1e-5 (adjust_rank.json)
        assert_close_ref(adjust_rank(tokens, level), rank_expected[_level_key(level)], 1e-5, f"level {level}")


def test_focus_multipliers_match_official(rank_report):
    for level, expected in rank_report["singular_value_multipliers"].items():
        factors, keep_residual = focus_multipliers(float(level))
        for name, value in expected.items():
            if name == "residual":
                assert keep_residual is bool(value), level
            else:
                assert factors[int(name[1:])] == pytest.approx(value, abs=1e-12), (level, name)


def test_adjust_rank_batch_equals_single_samples(tiny_inputs):
    tokens = tiny_inputs["adjust_rank_ctx"]
    batched = adjust_rank(tokens, 0.3)
    for i in range(tokens.shape[0]):
        assert_close_ref(batched[i : i + 1], adjust_rank(tokens[i : i + 1], 0.3), 1e-6, f"sample {i}")


def test_adjust_rank_half_point_is_identity_and_dtype_is_kept(tiny_inputs):
    tokens = tiny_inputs["adjust_rank_ctx"]
    assert torch.equal(adjust_rank(tokens, 0.5), tokens)
    half = adjust_rank(tokens.half(), 0.75)
    assert half.dtype == torch.float16
    assert_close_ref(half, adjust_rank(tokens.half().float(), 0.75), 1e-3, "float16 input")


@pytest.mark.parametrize("level", [-0.1, 1.01, float("nan"), "0.5"])
def test_focus_level_is_validated(tiny_inputs, level):
    with pytest.raises(VDInputError, match="focus level"):
        adjust_rank(tiny_inputs["adjust_rank_ctx"], level)


def test_apply_focus_keeps_every_global_token(rank_report, rank_expected, tiny_inputs):
    local = tiny_inputs["adjust_rank_ctx"]  # two images' local tokens
    level = next(lvl for lvl in rank_report["levels"] if 0 < lvl < 0.5)  # a semantic-side level
    glob = torch.randn(2, 1, local.shape[-1], generator=torch.Generator().manual_seed(0))
    # one sample whose context is the two 257-token image contexts concatenated (multi-context)
    context = torch.cat([glob[0:1], local[0:1], glob[1:2], local[1:2]], dim=1)
    out = apply_focus(context, level)
    n = local.shape[1] + 1
    assert out.shape == context.shape
    for k in range(2):
        assert torch.equal(out[:, k * n], glob[k])
        assert_close_ref(out[:, k * n + 1 : (k + 1) * n], rank_expected[_level_key(level)][k : k + 1], 1e-5,
                         f"block {k}")
    with pytest.raises(VDInputError, match=str(n)):
        apply_focus(context[:, 1:], level)


def test_low_rank_tokens_keep_top_singular_values(rank_expected, tiny_inputs):
    tokens = tiny_inputs["adjust_rank_ctx"]
    out = low_rank_tokens(tokens, rank=10)
    # rows of a demeaned matrix stay demeaned, so the per-token mean is restored exactly
    assert_close_ref(out.mean(-1), tokens.mean(-1), 1e-5, "token means")
    singular = torch.linalg.svdvals(out - out.mean(-1, keepdim=True))
    expected = rank_expected["singular_values_top24"]
    assert_close_ref(singular[:, :10], expected[:, :10], 1e-5, "kept singular values")
    assert singular[:, 10:].max() < 1e-4 * expected.max()
    with pytest.raises(VDInputError, match="rank"):
        low_rank_tokens(tokens, rank=0)


# --- colour ----------------------------------------------------------------------------------------

def test_simple_colour_adjustment_matches_official(tiny_dir, tiny_inputs):
    expected = load_tensors(tiny_dir / "color_adjust.safetensors")["simple"]
    images, reference = tiny_inputs["ca_imout"], tiny_inputs["ca_cx"]
    assert_close_ref(match_color_simple(images, reference), expected, 1e-5, "simple colour")
    # one reference per image gives the same as a shared one
    per_image = reference.expand(images.shape[0], -1, -1, -1)
    assert_close_ref(match_color_simple(images, per_image), expected, 1e-5, "per-image references")
    # only statistics matter: a 2×2 tiling has the same mean and (to 1e-4) the same unbiased std
    tiled = reference.repeat(1, 1, 2, 2)
    assert_close_ref(match_color_simple(images, tiled), expected, 1e-3, "larger reference")


def test_colour_adjustment_edge_cases(tiny_inputs):
    reference = tiny_inputs["ca_cx"]
    flat = match_color_simple(torch.full((1, 3, 8, 8), 0.5), reference)
    assert torch.allclose(flat, reference.mean(dim=(-2, -1), keepdim=True).expand_as(flat))
    with pytest.raises(VDInputError, match="batch"):
        match_color_simple(tiny_inputs["ca_imout"], reference.repeat(3, 1, 1, 1))


# --- captions --------------------------------------------------------------------------------------

def test_remove_duplicate_words_matches_official(tiny_dir):
    cases = json.loads((tiny_dir / "text_postprocess.json").read_text())["remove_duplicate_word"]
    for case in cases:
        if "output" in case:
            assert remove_duplicate_words(case["input"]) == case["output"], case["input"]


def test_remove_duplicate_words_on_decoded_captions(tiny_dir):
    # real Optimus outputs (bytes-level junk of a random model) and the official clean-up of them
    decoded = json.loads((tiny_dir / "ddim.json").read_text())["decoded_text"]
    pairs = [(raw, clean) for case in decoded.values() for raw, clean in zip(case["raw"], case["remove_duplicate_word"])]
    for flow in json.loads((tiny_dir / "app.json").read_text())["flows"].values():
        if "raw_decoded" in flow:
            pairs += zip(flow["raw_decoded"], flow["output"].split("\n"))
    assert len(pairs) >= len(decoded)  # at least one caption per recorded text flow
    for raw, clean in pairs:
        assert remove_duplicate_words(raw) == clean, raw


def test_empty_words_are_dropped_instead_of_raising(tiny_dir):
    # where the official raises IndexError (algorithm.md §8.3 / §11.10), spaces are normalised first
    cases = json.loads((tiny_dir / "text_postprocess.json").read_text())["remove_duplicate_word"]
    failing = [case["input"] for case in cases if case.get("error") == "IndexError"]
    assert failing
    for text in failing:
        assert remove_duplicate_words(text) == " ".join(text.split())
    assert remove_duplicate_words("  a cat  cat sat ") == "a cat sat"
    assert remove_duplicate_words("   ") == ""
