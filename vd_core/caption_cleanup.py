"""Removal of repeated words and phrases from generated captions (the WebUI's
``remove_duplicate_word``, applied to Image-to-Text and Text-Variation outputs; algorithm.md §8.3)."""

from __future__ import annotations

import numpy as np

# Punctuation peeled off the start / end of a word into tokens of its own, so that "cat," and
# "cat" compare equal as words and a comma separates repeats ("hello, hello" stays).
LEADING_PUNCTUATION = "([{"
TRAILING_PUNCTUATION = "?!.,:;}])"
# Marker token placed between a word and its peeled punctuation; " <puncnext> " is deleted at the
# end, which glues the punctuation back onto its word.
PUNCTUATION_JOIN = "<puncnext>"


def remove_duplicate_words(text: str) -> str:
    """Remove every word or phrase that immediately repeats the previous one.

    Examples (algorithm.md §8.3): "a cat cat sat" → "a cat sat"; "a b a b a b c" → "a b c";
    "hello hello, world" → "hello, world"; "hello, hello world!" is unchanged.

    Same result as the official function on every string it accepts. Deliberate fix: the official
    function raises ``IndexError`` on empty words (double, leading or trailing spaces); here the
    empty words are dropped first, i.e. runs of spaces become one and the ends are trimmed.
    Other whitespace (tabs, newlines) is kept inside words, as the official does.

    The official function works on lists of joined n-gram strings and rescans from the start after
    every removal (cubic or worse in the number of words: 5000 words took minutes). Its n-gram
    list always equals the n-grams of the current token list, so this works on the tokens
    themselves: pass n (n = 1, 2, … while two n-grams fit) removes, leftmost first, every n tokens
    that repeat the n before them, exactly the official order.
    """
    words = [word for word in text.split(" ") if word]
    if not words:
        return ""
    tokens = _split_punctuation(words)
    vocabulary: dict[str, int] = {}
    ids = np.asarray([vocabulary.setdefault(token, len(vocabulary)) for token in tokens], dtype=np.int64)
    n = 1
    while 2 * n <= len(ids):
        ids = _drop_immediate_repeats(ids, n)
        n += 1
    names = list(vocabulary)
    return " ".join(names[i] for i in ids).replace(f" {PUNCTUATION_JOIN} ", "")


def _split_punctuation(words: list[str]) -> list[str]:
    """Words → tokens: "(hi!" → ["(", "<puncnext>", "hi", "<puncnext>", "!"]."""
    tokens: list[str] = []
    for word in words:
        while word and word[0] in LEADING_PUNCTUATION:
            tokens += [word[0], PUNCTUATION_JOIN]
            word = word[1:]
        trailing: list[str] = []
        while word and word[-1] in TRAILING_PUNCTUATION:
            trailing = [PUNCTUATION_JOIN, word[-1]] + trailing
            word = word[:-1]
        if word:
            tokens.append(word)
        tokens += trailing
    return tokens


def _drop_immediate_repeats(ids: np.ndarray, n: int) -> np.ndarray:
    """Token ids with every immediate repeat of n tokens removed, leftmost first (the official
    order: after a removal at ``i`` the official rescans from 0, but only windows starting at
    ``i − n + 1`` or later changed, so the scan resumes there)."""
    start = 0
    while True:
        last = len(ids) - 2 * n  # the last start of two adjacent n-grams
        if last < start:
            return ids
        # candidates: the first and the last tokens of the two n-grams agree; then the whole n-grams
        first = ids[start : last + 1] == ids[start + n : last + 1 + n]
        final = ids[start + n - 1 : last + n] == ids[start + 2 * n - 1 : last + 2 * n]
        candidates = np.flatnonzero(first & final) + start
        found = next((int(i) for i in candidates if np.array_equal(ids[i : i + n], ids[i + n : i + 2 * n])), None)
        if found is None:
            return ids
        ids = np.concatenate([ids[: found + n], ids[found + 2 * n :]])
        start = max(0, found - n + 1)
