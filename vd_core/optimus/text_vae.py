"""The Optimus text VAE (``vae.text``, algorithm.md §6.2): sentences ↔ ``(B, L)`` text latents.

``encode`` lower-cases every sentence before tokenising it with the *cased* BERT vocabulary —
an official quirk (algorithm.md §11.8) kept so that latents match the official ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..checkpoint import describe_keys, load_exactly, read_state_dict, strip_prefix
from ..errors import CheckpointError, TokenizerNotFoundError, VDInputError
from ..validation import check_finite, check_result
from .bert_encoder import RELEASE_BERT_HEADS, BertEncoderConfig, BertLatentEncoder
from .decoding import caption_from_ids, generate_token_ids
from .gpt2_decoder import RELEASE_GPT2_HEADS, GPT2DecoderConfig, GPT2LatentDecoder
from .tokenizers import OptimusTokenizers, find_optimus_tokenizers

log = logging.getLogger(__name__)

MAX_WORD_PIECES = 77  # the official encode truncates to 77 word pieces before [CLS]/[SEP]
_ALL_IN_ONE_PREFIX = "vae.text."
_TIED = ("decoder.lm_head.weight", "decoder.transformer.wte.weight")


class OptimusVAE(nn.Module):
    """BERT encoder (``encoder``) + GPT-2 decoder (``decoder``) + their tokenizers.

    State-dict keys are those of the official ``optimus-vae.pth`` (without the causal-mask buffers).
    The constructor leaves the weights uninitialised: build it with :func:`load_optimus`.
    """

    def __init__(self, encoder_config: BertEncoderConfig, decoder_config: GPT2DecoderConfig,
                 tokenizers: OptimusTokenizers):
        super().__init__()
        if encoder_config.latent_size != decoder_config.latent_size:
            raise CheckpointError(
                f"Optimus encoder latent {encoder_config.latent_size} != decoder latent {decoder_config.latent_size}"
            )
        self.encoder = BertLatentEncoder(encoder_config)
        self.decoder = GPT2LatentDecoder(decoder_config)
        self.tokenizers = tokenizers
        _check_vocabularies(tokenizers, encoder_config, decoder_config)

    @property
    def latent_size(self) -> int:
        return self.decoder.config.latent_size

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, T)`` int64 BERT ids as the official ``encode`` builds them: lower-cased, at most 77
        word pieces, ``[CLS] … [SEP]``, right-padded with 0 to the longest sentence."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise VDInputError("Optimus encode takes a list of strings, e.g. ['a red car']")
        bert = self.tokenizers.bert
        rows = []
        for i, text in enumerate(texts):
            if not text.strip():
                raise VDInputError(f"text {i} is empty; Optimus needs at least one word to encode")
            pieces = bert.tokenize(text.lower())[:MAX_WORD_PIECES]
            if not pieces:  # BERT drops control characters: nothing would be encoded but [CLS] [SEP]
                raise VDInputError(
                    f"text {i} ({text[:40]!r}) holds no word, only control characters or spaces; give a sentence"
                )
            rows.append([bert.cls_id, *bert.convert_tokens_to_ids(pieces), bert.sep_id])
        width = max((len(r) for r in rows), default=2)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences → ``(B, L)`` text latents (posterior means, no sampling, no scaling), in the
        model's dtype and device.

        Raises:
            VDInputError: ``texts`` is not a list of strings, or one of them is empty/blank (the
                official code would encode ``[CLS] [SEP]`` or a random special token).
        """
        token_ids = self.tokenize(texts).to(self.encoder.linear.weight.device)
        return check_result(self.encoder(token_ids), "the Optimus encoding",
                            "the Optimus weights are probably damaged (NaN/inf in the file): download it again")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               greedy: bool = False, max_length: int = 30, generator: torch.Generator | None = None,
               use_kv_cache: bool = True) -> list[str]:
        """Text latents ``(B, L)`` → B captions (algorithm.md §6.2 ``decode``).

        Defaults are the official sampling: temperature 1, ``top_k`` 0, ``top_p`` 1.0 (which still
        drops the float32 tail), one multinomial draw per token latent after latent. Pass
        ``torch.Generator().manual_seed(s)`` to reproduce the official CPU run after
        ``torch.manual_seed(s)``; None draws a random seed (the global RNG is never used).
        ``greedy=True`` takes the argmax instead (not an official mode; deterministic).
        ``max_length`` counts ``<BOS>`` and ``<EOS>``. ``use_kv_cache=False`` recomputes the whole
        prefix at every step as the official code does; the ids are the same.
        """
        ids = self.generate_ids(latents, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                max_length=max_length, generator=generator, use_kv_cache=use_kv_cache)
        return [caption_from_ids(row, self.tokenizers.gpt2) for row in ids]

    @torch.no_grad()
    def generate_ids(self, latents: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     greedy: bool = False, max_length: int = 30, generator: torch.Generator | None = None,
                     use_kv_cache: bool = True) -> list[list[int]]:
        """As :meth:`decode` but returns the GPT-2 ids (``<BOS>`` first, ``<EOS>`` last) per latent."""
        self._check_decode_args(latents, temperature, top_k, top_p, greedy, max_length)
        weight = self.decoder.lm_head.weight
        gpt2 = self.tokenizers.gpt2
        return generate_token_ids(
            self.decoder, latents.to(device=weight.device, dtype=weight.dtype), bos_id=gpt2.bos_id,
            eos_id=gpt2.eos_id, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
            max_length=max_length, generator=generator, use_kv_cache=use_kv_cache,
        )

    def _check_decode_args(self, latents, temperature, top_k, top_p, greedy, max_length) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 2 or latents.shape[1] != self.latent_size:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise VDInputError(f"Optimus decode needs text latents (B, {self.latent_size}), got {shape}")
        check_finite(latents, "Optimus decode: the text latents", "they come from a failed sampling run or damaged "
                     "diffuser weights; sample again, or download the model again")
        if not greedy and not temperature > 0:
            raise VDInputError(f"temperature must be > 0 for sampling, got {temperature}")
        if top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise VDInputError(f"need top_k ≥ 0 and 0 ≤ top_p ≤ 1, got top_k={top_k}, top_p={top_p}")
        if not 2 <= max_length <= self.decoder.config.max_positions:
            raise VDInputError(
                f"max_length must be in [2, {self.decoder.config.max_positions}] (<BOS> and <EOS> "
                f"included), got {max_length}"
            )


def _check_vocabularies(tok: OptimusTokenizers, enc: BertEncoderConfig, dec: GPT2DecoderConfig) -> None:
    if len(tok.bert) != enc.vocab_size:
        raise TokenizerNotFoundError(
            f"BERT vocabulary {tok.bert.vocab_file} has {len(tok.bert)} word pieces but the Optimus encoder "
            f"has {enc.vocab_size}; use the bert-base-cased vocab.txt of the Optimus release."
        )
    if len(tok.gpt2) != dec.vocab_size:
        raise TokenizerNotFoundError(
            f"GPT-2 vocabulary {tok.gpt2.vocab_file} gives {len(tok.gpt2)} tokens with <PAD>/<BOS>/<EOS> but the "
            f"Optimus decoder has {dec.vocab_size}; use the gpt2 vocab.json and merges.txt of the Optimus release."
        )


def load_optimus(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, *,
                 bert_heads: int = RELEASE_BERT_HEADS, gpt2_heads: int = RELEASE_GPT2_HEADS,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> OptimusVAE:
    """Load ``optimus-vae.pth`` (keys without prefix) or the ``vae.text.*`` part of an all-in-one VD file.

    Sizes come from the tensor shapes; the attention heads of the encoder (``bert_heads``) and
    of the decoder (``gpt2_heads``), 12 each in the release, are in no file. They only change
    how each half splits its attention, so a model whose halves differ needs both. The
    causal-mask buffers are ignored when present; either of the tied ``decoder.lm_head.weight`` /
    ``decoder.transformer.wte.weight`` may be missing. Tokenizers
    are looked up as described in :mod:`.tokenizers` (``tokenizer_dir``, then beside ``path``,
    then the local Hugging Face cache).

    Raises:
        CheckpointError: unreadable file, a file of another kind (diffuser, image VAE, CLIP …),
            or missing/unexpected/mis-shaped keys (a few are named).
        TokenizerNotFoundError: tokenizer files not found, or not fitting the model.
    """
    state = _optimus_state(read_state_dict(path, what="Optimus text VAE file"), path)
    try:
        enc_config = BertEncoderConfig.from_state_dict(strip_prefix(state, "encoder."), bert_heads)
        dec_config = GPT2DecoderConfig.from_state_dict(strip_prefix(state, "decoder."), gpt2_heads)
    except KeyError as exc:
        key = ("decoder." if exc.args[0].startswith("transformer.") else "encoder.") + exc.args[0]
        raise CheckpointError(
            f"Optimus file {path} lacks the key {key!r}; it is incomplete or not an Optimus VAE "
            "(expected optimus-vae.pth from the Versatile Diffusion release)."
        ) from exc
    tokenizers = find_optimus_tokenizers(tokenizer_dir, model_path=path)
    with torch.device("meta"):
        model = OptimusVAE(enc_config, dec_config, tokenizers)
    load_exactly(
        model, state, f"Optimus file {path}", "the Optimus VAE",
        "Expected optimus-vae.pth (keys 'encoder.*', 'decoder.*') or an all-in-one VD file with 'vae.text.*' keys.",
    )
    model.decoder.tie_weights()  # assign=True replaced the shared parameter by two
    log.info("loaded Optimus from %s: latent %d, BERT %d×%d, GPT-2 %d×%d", path, enc_config.latent_size,
             enc_config.num_layers, enc_config.hidden_size, dec_config.num_layers, dec_config.hidden_size)
    return model.to(device=device, dtype=dtype).eval()


def _optimus_state(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The Optimus keys of ``state`` (prefix removed), masks dropped, the tied pair completed."""
    if any(k.startswith(_ALL_IN_ONE_PREFIX) for k in state):
        state = strip_prefix(state, _ALL_IN_ONE_PREFIX)
    elif not any(k.startswith(("encoder.embeddings.", "decoder.transformer.")) for k in state):
        raise CheckpointError(f"{path} is {_file_kind(state)}, not the Optimus text VAE; pass optimus-vae.pth.")
    # Causal masks are constants derived at run time; accepted and ignored.
    state = {k: v for k, v in state.items()
             if not (k.startswith("decoder.transformer.h.") and k.endswith(".attn.bias"))}
    lm_head, wte = _TIED
    if lm_head in state or wte in state:
        # Loading ties them with lm_head last, as the official load_state_dict order does.
        shared = state.get(lm_head, state.get(wte))
        state[lm_head] = state[wte] = shared
    return state


def _file_kind(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("diffuser.") for k in keys):
        return "a Versatile Diffusion diffuser file without Optimus weights (no 'vae.text.*' keys)"
    if any(k.startswith(("quant_conv.", "post_quant_conv.", "first_stage_model.")) for k in keys):
        return "an image VAE (kl-f8) file"
    if any(k.startswith(("text_model.", "vision_model.")) or ".text_model." in k for k in keys):
        return "a CLIP model file"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint"
    return f"not a recognised model file (keys such as {describe_keys(keys, 3)})"
