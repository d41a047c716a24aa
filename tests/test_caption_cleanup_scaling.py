"""Caption clean-up is no longer cubic in the word count, and gives exactly what the official
n-gram algorithm gives (the fixtures, and random captions against a plain port of it)."""

from __future__ import annotations

import json
import random
import time

from vd_core.caption_cleanup import PUNCTUATION_JOIN, _split_punctuation, remove_duplicate_words


def official_structure(text: str) -> str:
    """The official remove_duplicate_word's n-gram lists (joined strings, rescan from 0 after each
    removal), with the empty words dropped first as vd_core documents. Slow: short inputs only."""
    grams = _split_punctuation([w for w in text.split(" ") if w])
    if not grams:
        return ""
    n = 1
    while len(grams) > 1:
        i = 0
        while i < len(grams) - n:
            if grams[i] == grams[i + n]:
                del grams[i + 1 : i + n + 1]
                i = 0
            else:
                i += 1
        if len(grams) > 1:
            grams = [grams[i] + " " + grams[i + 1].split(" ")[n - 1] for i in range(len(grams) - 1)]
            n += 1
    return grams[0].replace(f" {PUNCTUATION_JOIN} ", "")


def test_fixture_outputs_unchanged(tiny_dir):
    cases = json.loads((tiny_dir / "text_postprocess.json").read_text())["remove_duplicate_word"]
    checked = 0
    for case in cases:
        if "output" in case:
            assert remove_duplicate_words(case["input"]) == case["output"] == official_structure(case["input"])
            checked += 1
    assert checked


def test_random_captions_match_the_official_algorithm():
    rng = random.Random(0)
    vocab = ["a", "b", "cat", "cat,", "(a", "b)", "the", "red.", "[x]", "yes!?"]
    for _ in range(400):
        text = " ".join(rng.choice(vocab[: rng.randint(2, len(vocab))]) for _ in range(rng.randint(0, 24)))
        assert remove_duplicate_words(text) == official_structure(text), text


def test_five_thousand_words_are_fast():
    rng = random.Random(1)
    vocab = ["a", "the", "cat", "sat", "on", "mat,", "(big", "dog)", "photo", "of"] + [f"w{i}" for i in range(300)]
    text = " ".join(rng.choice(vocab) for _ in range(5000))
    start = time.perf_counter()
    out = remove_duplicate_words(text)
    assert time.perf_counter() - start < 5.0  # the official structure: no result after minutes
    assert 0 < len(out.split()) <= 5000
    # a long run of one phrase collapses to one copy, in linear-ish time too
    assert remove_duplicate_words(" ".join(["a red car"] * 2000)) == "a red car"
