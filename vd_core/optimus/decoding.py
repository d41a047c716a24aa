"""Turning Optimus latents into token ids and captions (algorithm.md §6.2, ``decode`` steps 1–4).

Small pure functions:

* :func:`filter_logits` — the official top-k / top-p filter. With the official ``top_p = 1.0`` it
  is *not* a no-op: the cumulative softmax of the sorted logits overshoots 1.0 in float32 and
  the tail beyond the first crossing is removed (algorithm.md §11.6).
* :func:`generate_ids` — the decoding loop: start at ``<BOS>``, stop at ``<EOS>`` or, at
  ``max_length`` tokens (``<BOS>`` included), overwrite the last token with ``<EOS>``. With a KV
  cache only the new token is run each step; without, the whole prefix is recomputed (the
  official way). Both give the same ids.
* :func:`generate_token_ids` — sampling (official: one ``torch.multinomial`` draw per token,
  latent after latent, so a seeded generator reproduces the official RNG order) or greedy
  (argmax; not an official mode; all latents decoded together).
* :func:`official_text`, :func:`clean_up_tokenization`, :func:`caption_from_ids` — the official
  detokenisation, its clean-up replacements and the first/last word drop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .gpt2_decoder import GPT2LatentDecoder
from .tokenizers import GPT2BPETokenizer

Picker = Callable[[torch.Tensor], torch.Tensor]  # float32 logits (B, V) -> next ids (B,)

# The official clean-up (``clean_up_tokenization_spaces=True``), applied in this order.
# " do not" -> " don't" is an official quirk (algorithm.md §11.7), kept on purpose.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The official top-k / nucleus filter; removed logits become −inf.

    Args:
        logits: ``(..., V)`` float32 logits (already divided by the temperature).
        top_k: keep the ``top_k`` largest (0: no top-k filter).
        top_p: keep the smallest prefix of the sorted distribution whose cumulative probability
            exceeds ``top_p``, plus the first token crossing it (0: no top-p filter). 1.0 still
            removes the float32 tail, as the official.
    Returns:
        A filtered copy of ``logits``.
    """
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()  # keep the first token above top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def greedy_picker() -> Picker:
    return lambda logits: logits.argmax(dim=-1)


def sampling_picker(temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> Picker:
    """One official draw per row: ``multinomial(softmax(filter(logits / T)), 1)``.

    The draw runs on the generator's device, so a CPU generator seeded like the official global
    seed reproduces the official CPU tokens whatever device the model is on.
    """

    def pick(logits: torch.Tensor) -> torch.Tensor:
        ids = []
        for row in logits:  # 1-D rows: the official call shapes
            probs = torch.softmax(filter_logits(row / temperature, top_k, top_p), dim=-1)
            ids.append(torch.multinomial(probs.to(generator.device), 1, generator=generator))
        return torch.cat(ids).to(logits.device)

    return pick


@torch.no_grad()
def generate_ids(decoder: GPT2LatentDecoder, latents: torch.Tensor, pick: Picker, *, bos_id: int, eos_id: int,
                 max_length: int = 30, use_kv_cache: bool = True) -> list[list[int]]:
    """Decode all ``latents`` in lock-step (rows that reached ``<EOS>`` are padded with it).

    Args:
        decoder: the GPT-2 decoder.
        latents: ``(B, L)`` in the decoder's dtype and device.
        pick: chooses the next id of every row from float32 logits ``(B, V)``.
        bos_id, eos_id: GPT-2 ids of ``<BOS>`` and ``<EOS>``.
        max_length: most tokens per sequence, ``<BOS>`` and ``<EOS>`` included (official 30).
        use_kv_cache: reuse keys/values of earlier tokens (fast) or recompute the prefix (official).
    Returns:
        One id list per latent, ``<BOS>`` first and ``<EOS>`` last.
    """
    b = latents.shape[0]
    generated = torch.full((b, 1), bos_id, dtype=torch.long, device=latents.device)
    done = torch.zeros(b, dtype=torch.bool, device=latents.device)
    cache = decoder.start_cache(latents) if use_kv_cache else None
    while True:
        if cache is None:
            logits = decoder(generated, latents)[:, -1]
        else:
            logits = decoder(generated[:, -1:], latents, cache)[:, -1]
        next_ids = torch.where(done, eos_id, pick(logits.float()))
        generated = torch.cat((generated, next_ids[:, None]), dim=1)
        done |= next_ids == eos_id
        if bool(done.all()):
            break
        if generated.shape[1] >= max_length:
            generated[:, -1] = eos_id
            break
    rows = generated.tolist()
    return [row[: row.index(eos_id, 1) + 1] for row in rows]


def generate_token_ids(decoder: GPT2LatentDecoder, latents: torch.Tensor, *, bos_id: int, eos_id: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                       max_length: int = 30, generator: torch.Generator | None = None,
                       use_kv_cache: bool = True) -> list[list[int]]:
    """Token ids for every latent, sampled (official) or greedy.

    Sampling decodes latent after latent (official RNG order: all draws of latent 0, then of
    latent 1, …). ``generator=None`` uses a fresh randomly seeded CPU generator; the global RNG
    is never touched. Greedy decodes all latents at once and ignores temperature and generator.
    """
    common = dict(bos_id=bos_id, eos_id=eos_id, max_length=max_length, use_kv_cache=use_kv_cache)
    if greedy:
        return generate_ids(decoder, latents, greedy_picker(), **common)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    pick = sampling_picker(temperature, top_k, top_p, generator)
    return [generate_ids(decoder, latents[i : i + 1], pick, **common)[0] for i in range(latents.shape[0])]


def clean_up_tokenization(text: str) -> str:
    """The official clean-up of spaces before punctuation and contractions (incl. " do not" → " don't")."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def official_text(ids: list[int], tokenizer: GPT2BPETokenizer) -> str:
    """The official ``decode(ids, clean_up_tokenization_spaces=True)``.

    Runs of ordinary tokens are byte-level decoded (invalid UTF-8 → U+FFFD); each added token
    (``<PAD>``, ``<BOS>``, ``<EOS>``) is emitted as ``" " + token``; then :func:`clean_up_tokenization`.
    """
    pieces, run = [], []
    for token in tokenizer.convert_ids_to_tokens(ids):
        if tokenizer.is_added_token(token):
            if run:
                pieces.append(tokenizer.tokens_to_text(run))
                run = []
            pieces.append(" " + token)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.tokens_to_text(run))
    return clean_up_tokenization("".join(pieces))


def caption_from_ids(ids: list[int], tokenizer: GPT2BPETokenizer) -> str:
    """The official caption: :func:`official_text`, split on whitespace, first and last words dropped.

    The dropped words are normally ``<BOS>`` and ``<EOS>``; a first generated token without a
    leading space is glued to ``<BOS>`` and dropped with it (official behaviour).
    """
    return " ".join(official_text(ids, tokenizer).split()[1:-1])
