"""The Optimus decoder: GPT-2 with the latent injected twice (algorithm.md §6.2, "Decoder").

* Embedding injection: ``linear_emb(z)`` is added to every input embedding.
* Memory injection: ``linear(z)`` is cut into one ``C``-wide slice per layer; slice ``l`` is the
  key *and* the value of one extra memory slot in front of layer ``l``'s keys/values (not
  passed through ``c_attn``). Token positions therefore start at 1.

Pre-LN blocks, tanh GELU, LayerNorm eps 1e-5, Conv1D weights stored ``[in, out]``, scores
divided by ``sqrt(head_dim)``, masked scores set to −10000 (not −inf), ``lm_head`` tied to
``wte``. Parameter names are the official ``GPT2ForLatentConnector_XX`` ones; the causal-mask
buffers ``transformer.h.N.attn.bias`` of the official file are derived here, not stored.

The memory slots are the first entries of a :class:`LatentKVCache`, so incremental decoding
(one new token per step, keys/values of earlier tokens reused) and the official full-prefix
recomputation share one code path. The arithmetic follows the official order of operations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VDInputError

_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.")


RELEASE_GPT2_HEADS = 12  # the released GPT-2's attention heads (no file stores them)


@dataclass(frozen=True)
class GPT2DecoderConfig:
    vocab_size: int  # 50260 = 50257 BPE tokens + <PAD>, <BOS>, <EOS>
    hidden_size: int  # C = 768
    num_layers: int  # 12
    num_heads: int  # 12 (not stored in any file)
    max_positions: int  # 1024 (also the official causal-mask size n_ctx)
    mlp_size: int  # 3072
    latent_size: int  # L = 768

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise VDInputError(f"GPT-2 width {self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor],
                        num_heads: int = RELEASE_GPT2_HEADS) -> "GPT2DecoderConfig":
        """Sizes from the shapes of a decoder state dict (keys without the ``decoder.`` prefix).

        Raises:
            KeyError: a key needed to read a size is missing (the loader turns it into a CheckpointError).
        """
        vocab_size, hidden = state["transformer.wte.weight"].shape
        layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=len(layers),
            num_heads=num_heads,
            max_positions=state["transformer.wpe.weight"].shape[0],
            mlp_size=state["transformer.h.0.mlp.c_fc.weight"].shape[1],
            latent_size=state["transformer.linear_emb.weight"].shape[1],
        )


@dataclass
class LatentKVCache:
    """Keys and values seen so far, per layer; entry 0 along the sequence axis is the memory slot.

    ``keys[l]``: ``(B, H, head_dim, S)`` (transposed, as the official attention multiplies them);
    ``values[l]``: ``(B, H, S, head_dim)``; ``S`` = 1 + number of tokens already processed.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.values[0].shape[-2]


class Conv1D(nn.Module):
    """GPT-2's linear layer with the weight stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, c: GPT2DecoderConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.c_attn = Conv1D(c.hidden_size, 3 * c.hidden_size)
        self.c_proj = Conv1D(c.hidden_size, c.hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` → ``(B, H, T, head_dim)``."""
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """Attention of the new positions ``x (B, T, C)`` over the past keys/values and themselves.

        Returns ``(out (B, T, C), keys (B, H, hd, S+T), values (B, H, S+T, hd))``.
        """
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        keys = torch.cat((past_k, self.split_heads(k).transpose(-1, -2)), dim=-1)
        values = torch.cat((past_v, self.split_heads(v)), dim=-2)
        w = torch.matmul(self.split_heads(q), keys) / math.sqrt(values.shape[-1])
        n_new, n_all = w.shape[-2], w.shape[-1]
        if n_new > 1:
            # Causal mask with the official −10000 fill (the memory slot is visible to all).
            query_pos = torch.arange(n_all - n_new, n_all, device=w.device)[:, None]
            w = w.masked_fill(torch.arange(n_all, device=w.device)[None, :] > query_pos, -10000.0)
        a = torch.matmul(torch.softmax(w, dim=-1), values)
        a = a.permute(0, 2, 1, 3).contiguous().view(x.shape)
        return self.c_proj(a), keys, values


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, written exactly as the official so that rounding matches."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class GPT2MLP(nn.Module):
    def __init__(self, c: GPT2DecoderConfig):
        super().__init__()
        self.c_fc = Conv1D(c.hidden_size, c.mlp_size)
        self.c_proj = Conv1D(c.mlp_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2DecoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=1e-5)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=1e-5)
        self.mlp = GPT2MLP(c)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        a, keys, values = self.attn(self.ln_1(x), past_k, past_v)
        x = x + a
        return x + self.mlp(self.ln_2(x)), keys, values


class GPT2Transformer(nn.Module):
    """The official ``transformer`` submodule, including the two latent projections."""

    def __init__(self, c: GPT2DecoderConfig):
        super().__init__()
        # Uninitialised: the weights always come from a file (and random init on "meta" is slow).
        self.wte = nn.Embedding.from_pretrained(torch.empty(c.vocab_size, c.hidden_size), freeze=False)
        self.wpe = nn.Embedding.from_pretrained(torch.empty(c.max_positions, c.hidden_size), freeze=False)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=1e-5)
        self.linear = nn.Linear(c.latent_size, c.hidden_size * c.num_layers, bias=False)  # memory slots
        self.linear_emb = nn.Linear(c.latent_size, c.hidden_size, bias=False)  # added embedding


class GPT2LatentDecoder(nn.Module):
    """Next-token logits of GPT-2 conditioned on an Optimus latent."""

    def __init__(self, config: GPT2DecoderConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """``lm_head`` shares ``wte``'s weight (one tensor, both state-dict keys)."""
        self.lm_head.weight = self.transformer.wte.weight

    def start_cache(self, latent: torch.Tensor) -> LatentKVCache:
        """The cache before any token: one memory slot per layer made from ``latent (B, L)``."""
        slots = self.transformer.linear(latent)[:, None, :].split(self.config.hidden_size, dim=2)
        attn = self.transformer.h[0].attn
        keys = [attn.split_heads(s).transpose(-1, -2) for s in slots]
        values = [attn.split_heads(s) for s in slots]
        return LatentKVCache(keys, values)

    def forward(self, input_ids: torch.Tensor, latent: torch.Tensor,
                cache: LatentKVCache | None = None) -> torch.Tensor:
        """Logits for every input position.

        Args:
            input_ids: ``(B, T)`` int64 GPT-2 ids (the whole prefix when ``cache`` is None, else
                only the tokens the cache has not seen).
            latent: ``(B, L)`` Optimus latent, in the parameters' dtype.
            cache: keys/values of earlier steps (from :meth:`start_cache`); extended in place.
                None: a fresh one, i.e. the official call ``decoder(input_ids, past=latent)``.
        Returns:
            ``(B, T, V)`` logits; row ``t`` predicts the token after ``input_ids[:, t]``.
        """
        cache = self.start_cache(latent) if cache is None else cache
        t0, n = cache.length, input_ids.shape[1]
        if t0 + n > self.config.max_positions:
            raise VDInputError(
                f"{t0 + n - 1} GPT-2 tokens exceed the decoder's {self.config.max_positions - 1} usable positions"
            )
        tr = self.transformer
        positions = torch.arange(t0, t0 + n, device=input_ids.device)  # memory slot counts as position 0
        h = tr.wte(input_ids) + tr.wpe(positions)[None] + tr.linear_emb(latent)[:, None, :]
        for i, block in enumerate(tr.h):
            h, cache.keys[i], cache.values[i] = block(h, cache.keys[i], cache.values[i])
        return F.linear(tr.ln_f(h), self.lm_head.weight)
