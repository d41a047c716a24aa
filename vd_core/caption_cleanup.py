"""Removal of repeated words and phrases from generated captions (the WebUI's
``remove_duplicate_word``, applied to Image-to-Text and Text-Variation outputs; SPEC §8.3)."""

from __future__ import annotations

# Punctuation peeled off the start / end of a word into tokens of its own, so that "cat," and
# "cat" compare equal as words and a comma separates repeats ("hello, hello" stays).
LEADING_PUNCTUATION = "([{"
TRAILING_PUNCTUATION = "?!.,:;}])"
# Marker token placed between a word and its peeled punctuation; " <puncnext> " is deleted at the
# end, which glues the punctuation back onto its word.
PUNCTUATION_JOIN = "<puncnext>"


def remove_duplicate_words(text: str) -> str:
    """Remove every word or phrase that immediately repeats the previous one.

    Examples (SPEC §8.3): "a cat cat sat" → "a cat sat"; "a b a b a b c" → "a b c";
    "hello hello, world" → "hello, world"; "hello, hello world!" is unchanged.

    Same result as the official function on every string it accepts. Deliberate fix: the official
    function raises ``IndexError`` on empty words (double, leading or trailing spaces); here the
    empty words are dropped first, i.e. runs of spaces become one and the ends are trimmed.
    Other whitespace (tabs, newlines) is kept inside words, as the official does.
    """
    words = [word for word in text.split(" ") if word]
    if not words:
        return ""
    grams = _split_punctuation(words)
    # Pass n works on the list of overlapping n-grams: drop immediate repeats, then extend every
    # n-gram by the last word of its right neighbour, until a single n-gram (the sentence) is left.
    n = 1
    while len(grams) > 1:
        _drop_immediate_repeats(grams, n)
        if len(grams) > 1:
            grams = [grams[i] + " " + grams[i + 1].split(" ")[n - 1] for i in range(len(grams) - 1)]
            n += 1
    return grams[0].replace(f" {PUNCTUATION_JOIN} ", "")


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


def _drop_immediate_repeats(grams: list[str], n: int) -> None:
    """In place: while some n-gram ``grams[i]`` equals ``grams[i + n]`` (the next n words repeat
    it), delete the n entries after ``grams[i]`` and rescan from the start (the official order)."""
    i = 0
    while i < len(grams) - n:
        if grams[i] == grams[i + n]:
            del grams[i + 1 : i + n + 1]
            i = 0
        else:
            i += 1
