"""The context layer of both diffusers: a one-block SpatialTransformer (algorithm.md §3.3).

Every context layer, in either diffuser, sees its input as an image (B, C, H, W) — the text
diffuser's (B, C, second_dim, 1) activations are a second_dim×1 image — and cross-attends to the
context tokens (B, N, D). Child names reproduce the official keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image_layers import group_norm


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, L, C) over context (B, N, D) (self-attention when D = C and the
    context is x). q/k/v projections without bias, softmax(q·kᵀ/√d_head)·v, output Linear with bias."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # A one-element Sequential keeps the official key `to_out.0` (its index 1 was Dropout(0)).
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, n, C) -> (B, heads, n, d_head)
            return t.view(batch, t.shape[1], heads, dim // heads).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        # SDPA's default scale is d_head^-0.5, the official one; no mask, no upcast (algorithm.md §3.3).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, dim))


class GEGLU(nn.Module):
    """Linear(C → 2·inner) split into value and gate: ``value · GELU_erf(gate)``."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(C → 4C) then Linear(4C → C); ``nn.Identity`` stands for the official Dropout(0) so the
    output projection keeps its key ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each residual.
    Submodules are declared in the official order so that ``state_dict()`` lists keys as the
    release does (attn1, ff, attn2, norm1–3)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, num_heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), context (B, N, D) -> (B, L, C)."""
        h = self.norm1(x)
        x = self.attn1(h, h) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm(eps 1e-6) → Conv1×1 → transformer block over the H·W tokens → Conv1×1, plus the
    input: x (B, C, H, W), context (B, N, D) -> (B, C, H, W)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, num_heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # Back in x's memory format: the bare view of the (B, H·W, C) tokens is channels-last, and
        # handing that to an NCHW network makes every later convolution re-lay its weights out
        # on each call (measured: ~10 % of a CPU forward). In channels-last both views are free.
        h = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.proj_out(h.contiguous(memory_format=memory_format_of(x))) + x


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC-strided (B, C, H, W) tensor, else ``torch.contiguous_format``
    (also when both describe it, e.g. H = W = 1)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
