"""The two Optimus tokenizers (algorithm.md §6.2) and where their files are looked up.

* BERT (encoder side): the basic + WordPiece tokenizer of the cased ``bert-base-cased`` vocabulary
  (``vocab.txt``, 28996 pieces), with the official settings: no lower-casing and no accent
  stripping inside the tokenizer (the Optimus encoder lower-cases the sentence itself, see
  ``text_vae.py``), punctuation and CJK characters split, ``[UNK]`` for words that have no
  WordPiece split or are longer than 100 characters.
* GPT-2 (decoder side): the byte-level BPE of ``vocab.json`` + ``merges.txt`` (50257 tokens) plus
  the three tokens the official code adds at run time, in this order: ``<PAD>`` 50257,
  ``<BOS>`` 50258, ``<EOS>`` 50259. They are in no file.

Both are small pure-Python re-implementations of the official vendored tokenizers (no
transformers API is involved, so behaviour does not drift with transformers versions).

Look-up order of the files (first hit wins, each tokenizer separately; nothing is ever downloaded):

1. ``tokenizer_dir`` given by the caller;
2. ``optimus_tokenizers/`` beside the model file, then the model file's own folder;
3. the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default) for
   ``google-bert/bert-base-cased`` / ``bert-base-cased`` and ``openai-community/gpt2`` / ``gpt2``,
   read only, read at call time;
4. otherwise :class:`TokenizerNotFoundError` naming the files and where to put them.

In each folder of steps 1–2 these layouts are recognised: ``bert-base-cased/vocab.txt`` and
``gpt2/{vocab.json,merges.txt}`` (the layout of ``optimus_tokenizers/``), the official repository's
names ``bert-base-cased-vocab.txt`` and ``gpt2-{vocab.json,merges.txt}``, or the bare file names.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..errors import TokenizerNotFoundError, VDInputError

log = logging.getLogger(__name__)

GPT2_ADDED_TOKENS = ("<PAD>", "<BOS>", "<EOS>")  # appended after the BPE vocabulary in this order
_BERT_MAX_WORD_CHARS = 100
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class BertWordPieceTokenizer:
    """Official BERT basic + WordPiece tokenizer, ``do_lower_case=False`` (algorithm.md §6.2)."""

    def __init__(self, vocab_file: str | os.PathLike):
        self.vocab_file = Path(vocab_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}
        for token in ("[UNK]", "[CLS]", "[SEP]"):
            if token not in self.vocab:
                raise TokenizerNotFoundError(
                    f"{self.vocab_file} is not a BERT WordPiece vocabulary (no {token!r}); use the "
                    "bert-base-cased vocab.txt."
                )
        self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]"))

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text`` (case kept, accents kept)."""
        words = _bert_split_cjk(_bert_clean(text)).split()
        pieces = []
        for word in words:
            for part in _bert_split_punctuation(word):
                pieces.extend(self._wordpiece(part))
        return pieces

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_id) for t in tokens]

    def _wordpiece(self, word: str) -> list[str]:
        # Greedy longest-match-first; a word with an unmatched remainder becomes one [UNK].
        if len(word) > _BERT_MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces


def _bert_clean(text: str) -> str:
    # Drop NUL, U+FFFD and control characters; every whitespace character becomes a space.
    out = []
    for ch in text:
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ord(ch) in (0, 0xFFFD) or unicodedata.category(ch).startswith("C"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _bert_split_cjk(text: str) -> str:
    return "".join(f" {ch} " if _is_cjk(ord(ch)) else ch for ch in text)


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)  # every ASCII non-alphanumeric symbol counts, as in BERT
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _bert_split_punctuation(word: str) -> list[str]:
    parts, current = [], ""
    for ch in word:
        if _is_punctuation(ch):
            if current:
                parts.append(current)
            parts.append(ch)
            current = ""
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GPT2BPETokenizer:
    """Official GPT-2 byte-level BPE tokenizer with ``<PAD>``, ``<BOS>``, ``<EOS>`` appended (algorithm.md §6.2)."""

    def __init__(self, vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        with open(self.merges_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.added_tokens = {t: len(self.encoder) + i for i, t in enumerate(GPT2_ADDED_TOKENS)}
        self.added_ids = {i: t for t, i in self.added_tokens.items()}
        self.pad_id, self.bos_id, self.eos_id = (self.added_tokens[t] for t in GPT2_ADDED_TOKENS)
        self.byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._bpe_cache: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.encoder) + len(self.added_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; the added tokens and ``<|endoftext|>`` are matched literally.

        As in the official tokenizer, the text between special tokens is stripped and gets one
        leading space before BPE, so ``"<BOS> a man . <EOS>"`` gives ``<BOS> Ġa Ġman Ġ. <EOS>``.
        """
        import regex  # a dependency of transformers; only needed to encode, never to decode

        specials = sorted([*self.added_tokens, "<|endoftext|>"], key=len, reverse=True)
        ids = []
        for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
            if part in self.added_tokens:
                ids.append(self.added_tokens[part])
            elif part == "<|endoftext|>":
                ids.append(self.encoder[part])
            elif part.strip():
                byte_encoder = _bytes_to_unicode()
                for word in regex.findall(_GPT2_PATTERN, " " + part.strip()):
                    mapped = "".join(byte_encoder[b] for b in word.encode("utf-8"))
                    ids.extend(self.encoder[t] for t in self._bpe(mapped))
        return ids

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        tokens = []
        for i in ids:
            token = self.added_ids.get(i, self.decoder.get(i))
            if token is None:
                raise VDInputError(f"token id {i} is outside the GPT-2 vocabulary of {len(self)} tokens")
            tokens.append(token)
        return tokens

    def is_added_token(self, token: str) -> bool:
        return token in self.added_tokens

    def tokens_to_text(self, tokens: list[str]) -> str:
        """Byte-level decoding of ordinary BPE tokens; invalid UTF-8 becomes U+FFFD (``errors='replace'``)."""
        return bytes(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", errors="replace")

    def _bpe(self, word: str) -> list[str]:
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._bpe_cache[word] = parts
        return parts


class OptimusTokenizers(NamedTuple):
    bert: BertWordPieceTokenizer
    gpt2: GPT2BPETokenizer


# Per tokenizer: the file sets recognised inside one folder, in order of preference.
_BERT_LAYOUTS = (("bert-base-cased/vocab.txt",), ("bert-base-cased-vocab.txt",), ("vocab.txt",))
_GPT2_LAYOUTS = (("gpt2/vocab.json", "gpt2/merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt"),
                 ("vocab.json", "merges.txt"))
_HF_REPOS = {"bert": (("google-bert/bert-base-cased", "bert-base-cased"), ("vocab.txt",)),
             "gpt2": (("openai-community/gpt2", "gpt2"), ("vocab.json", "merges.txt"))}


def find_optimus_tokenizers(tokenizer_dir: str | os.PathLike | None = None,
                            model_path: str | os.PathLike | None = None) -> OptimusTokenizers:
    """Load both tokenizers from the first location that has their files (order in the module doc).

    Raises:
        TokenizerNotFoundError: a tokenizer's files are in none of the locations; the message
            lists the files, the folders searched and where to put them.
    """
    folders = []
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            log.warning("tokenizer folder %s does not exist; looking elsewhere", tokenizer_dir)
        folders.append(Path(tokenizer_dir))
    if model_path is not None:
        folders += [Path(model_path).parent / "optimus_tokenizers", Path(model_path).parent]
    bert_files = _find("bert", _BERT_LAYOUTS, folders)
    gpt2_files = _find("gpt2", _GPT2_LAYOUTS, folders)
    log.info("Optimus tokenizers: %s, %s", bert_files[0], gpt2_files[0])
    return OptimusTokenizers(BertWordPieceTokenizer(*bert_files), GPT2BPETokenizer(*gpt2_files))


def _find(kind: str, layouts, folders: list[Path]) -> tuple[Path, ...]:
    for folder in folders:
        for names in layouts:
            files = tuple(folder / n for n in names)
            if all(f.is_file() for f in files):
                return files
    cached = _from_hf_cache(*_HF_REPOS[kind])
    if cached is not None:
        return cached
    wanted = ("bert-base-cased/vocab.txt" if kind == "bert" else "gpt2/vocab.json and gpt2/merges.txt")
    searched = ", ".join(str(f) for f in folders) or "(no folder given)"
    raise TokenizerNotFoundError(
        f"Optimus {'BERT' if kind == 'bert' else 'GPT-2'} tokenizer files not found: need {wanted}. "
        f"Searched {searched} and the local Hugging Face cache. Put the official files (from the "
        "Versatile Diffusion repository, lib/model_zoo/optimus_models/vocab/) in a folder "
        "'optimus_tokenizers/' beside optimus-vae.pth as bert-base-cased/vocab.txt, gpt2/vocab.json "
        "and gpt2/merges.txt, or pass tokenizer_dir."
    )


def _from_hf_cache(repo_ids: tuple[str, ...], names: tuple[str, ...]) -> tuple[Path, ...] | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # reads the cache only, never the network
    except ImportError:
        return None
    # The environment is read now, not when huggingface_hub was imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    for repo_id in repo_ids:
        found = [try_to_load_from_cache(repo_id, n, cache_dir=cache_dir) for n in names]
        if all(isinstance(f, str) for f in found):
            return tuple(Path(f) for f in found)
    return None
