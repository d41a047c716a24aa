"""The Optimus encoder: BERT-base-cased with the latent connector (algorithm.md §6.2, "Encoder").

Post-LN transformer, erf GELU, LayerNorm eps 1e-12, additive −10000 for padded keys, token
type 0, pooler = tanh(Linear) of the first token, then ``linear`` (no bias) to ``2·L`` values
whose first half is the posterior mean. Parameter names are those of the official
``BertForLatentConnector_XX`` (``embeddings.*``, ``encoder.layer.N.*``, ``pooler.dense.*``,
``linear.weight``). The arithmetic follows the official order of operations so that the
latents agree to float rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VDInputError

_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.")


RELEASE_BERT_HEADS = 12  # the released BERT's attention heads (no file stores them)


@dataclass(frozen=True)
class BertEncoderConfig:
    vocab_size: int  # 28996 in the release
    hidden_size: int  # 768
    num_layers: int  # 12
    num_heads: int  # 12 (not stored in any file)
    intermediate_size: int  # 3072
    max_positions: int  # 512
    type_vocab_size: int  # 2
    latent_size: int  # L = 768; ``linear`` has 2·L outputs (mean, log-variance)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise VDInputError(f"BERT width {self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor],
                        num_heads: int = RELEASE_BERT_HEADS) -> "BertEncoderConfig":
        """Sizes from the shapes of an encoder state dict (keys without the ``encoder.`` prefix).

        Raises:
            KeyError: a key needed to read a size is missing (the loader turns it into a CheckpointError).
        """
        vocab_size, hidden = state["embeddings.word_embeddings.weight"].shape
        layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=len(layers),
            num_heads=num_heads,
            intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_positions=state["embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
            latent_size=state["linear.weight"].shape[0] // 2,
        )


def _layer_norm(c: BertEncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=1e-12)


def _embedding(rows: int, width: int) -> nn.Embedding:
    # Uninitialised: the weights always come from a file (and random init on "meta" is slow).
    return nn.Embedding.from_pretrained(torch.empty(rows, width), freeze=False)


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.word_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _embedding(c.max_positions, c.hidden_size)
        self.token_type_embeddings = _embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = _layer_norm(c)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        token_types = torch.zeros_like(token_ids)  # Optimus feeds one segment
        h = self.word_embeddings(token_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(h + self.token_type_embeddings(token_types))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, h: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(h)), self._heads(self.key(h)), self._heads(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + additive_mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out.permute(0, 2, 1, 3).contiguous().view(h.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = _layer_norm(c)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)  # post-LN


class BertAttention(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, h: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h, additive_mask), h)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dense(h)
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))  # erf GELU, written as the official


class BertOutput(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = _layer_norm(c)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, h: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, additive_mask)
        return self.output(self.intermediate(a), a)


class BertLayers(nn.Module):
    """The layer stack (official attribute ``encoder``, holding ``layer``)."""

    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))

    def forward(self, h: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h, additive_mask)
        return h


class BertPooler(nn.Module):
    def __init__(self, c: BertEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class BertLatentEncoder(nn.Module):
    """Token ids → Optimus posterior mean."""

    def __init__(self, config: BertEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayers(config)
        self.pooler = BertPooler(config)
        self.linear = nn.Linear(config.hidden_size, 2 * config.latent_size, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Posterior mean of ``token_ids``.

        Args:
            token_ids: ``(B, T)`` int64, ``[CLS] … [SEP]`` right-padded with 0; id 0 marks padding
                (the official attention mask is ``id > 0``).
        Returns:
            ``(B, L)`` latent means in the parameters' dtype (unbounded, no scaling). The
            log-variance half of ``linear`` is discarded, as in the official ``encode``.
        """
        if token_ids.shape[1] > self.config.max_positions:
            raise VDInputError(
                f"{token_ids.shape[1]} BERT tokens exceed the encoder's {self.config.max_positions} positions"
            )
        dtype = self.linear.weight.dtype
        keep = (token_ids > 0).to(dtype)[:, None, None, :]
        additive_mask = (1.0 - keep) * -10000.0  # algorithm.md §6.2: additive −10000, not −inf
        h = self.encoder(self.embeddings(token_ids), additive_mask)
        mean, _logvar = self.linear(self.pooler(h)).chunk(2, dim=-1)
        return mean
