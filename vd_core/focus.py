"""Semantic ↔ style focus of CLIP image contexts (the WebUI's "Focus" slider, algorithm.md §8.1), and the
low-rank local tokens of the legacy I2T2I edit (algorithm.md §10 step 6).

The local (patch) tokens of an image context are decomposed as ``per-token mean + U·diag(S)·Vᵀ +
residual``. Focus below 0.5 shrinks the top principal components (what the image *is*, its
semantics); above 0.5 it shrinks components 5…19 and drops the residual (keeping the dominant
*style* directions). The official code uses ``torch.pca_lowrank`` with 100 power iterations on
batch 1; that equals an exact truncated SVD to float32 noise (algorithm.md §8.1), so this module uses
``torch.linalg.svd``: deterministic, no random numbers, and any batch size (per-sample statistics).
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import VDInputError

TOKENS_PER_IMAGE = 257
"""Tokens of one CLIP image context: the global (class) token then 16×16 local patch tokens."""

FOCUS_RANK = 20  # q of the official adjust_rank: components that the focus can reweight
SEMANTIC_DROP_RANK = 1  # level 0 zeroes components 0…1 (max_drop_rank[0] = 1)
STYLE_KEEP_RANK = 5  # the style side never touches components 0…4 (max_drop_rank[1] = 5)


def focus_multipliers(level: float) -> tuple[list[float], bool]:
    """Per-component factors for singular values 0…19 at ``level`` ∈ [0, 1], and whether the
    residual beyond rank 20 is kept.

    Semantic side (level < 0.5), i = 0, 1: ``max(0, i/2·(1−y0) + y0)`` with
    ``y0 = 2·(e^{2l−1} − e^{−1})/(1 − e^{−1}) − 1``. Style side (level > 0.5), i = 5…19:
    ``max(0, (i−19)/(−15)·(1−y0) + y0)`` with ``y0 = 16·(e^{2l−1} − e)/(1 − e) − 15``, and the
    residual is dropped for every level above 0.5 (the official discontinuity, algorithm.md §8.1).
    Computed in float64 like the official numpy code.
    """
    _check_level(level)
    factors = [1.0] * FOCUS_RANK
    ramp = math.exp(2 * level - 1)  # e^{2l−1}: e^{−1} at level 0, 1 at 0.5, e at level 1
    if level < 0.5:
        span = SEMANTIC_DROP_RANK + 1
        y0 = (ramp - math.exp(-1)) / (1 - math.exp(-1)) * (1 + SEMANTIC_DROP_RANK) - SEMANTIC_DROP_RANK
        for i in range(SEMANTIC_DROP_RANK + 1):
            factors[i] = max(0.0, i / span * (1 - y0) + y0)
        return factors, True
    if level > 0.5:
        depth = FOCUS_RANK - STYLE_KEEP_RANK
        y0 = (ramp - math.e) / (1 - math.e) * (1 + depth) - depth
        for i in range(STYLE_KEEP_RANK, FOCUS_RANK):
            factors[i] = max(0.0, (i - (FOCUS_RANK - 1)) / (STYLE_KEEP_RANK - FOCUS_RANK) * (1 - y0) + y0)
        return factors, False
    return factors, True


def adjust_rank(local_tokens: torch.Tensor, level: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Semantic (0) ↔ style (1) focus of local tokens ``(B, N, D)`` (N = 256 for CLIP); 0.5 = unchanged.

    Each sample is handled on its own: ``std0`` = unbiased std over its N·D values; the per-token
    feature mean is removed; the rank-20 truncated SVD is reweighted by :func:`focus_multipliers`;
    mean and (for level ≤ 0.5) residual are added back, and the result is rescaled to std ``std0``.
    Computed in float32 (float16/bfloat16 inputs are upcast), returned in the input dtype.
    ``generator`` is accepted for the contract's signature and unused: the exact SVD draws no
    random numbers.

    Raises:
        VDInputError: ``level`` outside [0, 1], or ``local_tokens`` not 3-D.
    """
    _check_level(level)
    if local_tokens.ndim != 3:
        raise VDInputError(f"focus: local tokens must be (B, N, D), got shape {tuple(local_tokens.shape)}.")
    if level == 0.5:
        return local_tokens
    x = local_tokens.float()
    std0 = x.std(dim=(-2, -1), keepdim=True)
    mean = x.mean(-1, keepdim=True)
    u, s, vh = _truncated_svd(x - mean, FOCUS_RANK)
    low_rank = (u * s[:, None, :]) @ vh
    factors, keep_residual = focus_multipliers(level)
    scale = torch.tensor(factors[: s.shape[-1]], dtype=s.dtype, device=s.device)
    x_new = (u * (s * scale)[:, None, :]) @ vh + mean
    if keep_residual:
        x_new = x_new + (x - mean - low_rank)
    # A degenerate (all-equal) sample would give 0/0; flooring the std keeps it finite instead of NaN.
    std_new = x_new.std(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (x_new / std_new * std0).to(local_tokens.dtype)


def apply_focus(image_context: torch.Tensor, level: float, generator: torch.Generator | None = None,
                tokens_per_image: int = TOKENS_PER_IMAGE) -> torch.Tensor:
    """Focus of an image context ``(B, 257·k, D)`` (k images concatenated): :func:`adjust_rank` on the
    256 local tokens of every 257-token block, each block's global (first) token kept — what the
    WebUI does for image variation and every image slot of dual/multi context (algorithm.md §8).

    Raises:
        VDInputError: ``level`` outside [0, 1], or the token count is not a multiple of 257.
    """
    _check_level(level)
    if image_context.ndim != 3 or image_context.shape[1] % tokens_per_image:
        raise VDInputError(
            f"focus: an image context must be (B, {tokens_per_image}·k, D) (k CLIP image contexts "
            f"concatenated), got shape {tuple(image_context.shape)}; text contexts have no focus."
        )
    if level == 0.5:
        return image_context
    b, n, d = image_context.shape
    blocks = image_context.reshape(b * (n // tokens_per_image), tokens_per_image, d)
    local = adjust_rank(blocks[:, 1:], level)
    return torch.cat([blocks[:, :1], local], dim=1).reshape(b, n, d)


def low_rank_tokens(local_tokens: torch.Tensor, rank: int = 10) -> torch.Tensor:
    """Rank-``rank`` approximation of tokens ``(B, N, D)`` with the per-token mean removed before and
    added back after (the I2T2I image context, algorithm.md §10 step 6, rank 10). Exact SVD per sample,
    float32 inside, returned in the input dtype.

    Raises:
        VDInputError: ``rank`` not in [1, min(N, D)], or ``local_tokens`` not 3-D.
    """
    if local_tokens.ndim != 3:
        raise VDInputError(f"low-rank tokens: expected (B, N, D), got shape {tuple(local_tokens.shape)}.")
    max_rank = min(local_tokens.shape[-2:])
    if not 1 <= rank <= max_rank:
        raise VDInputError(f"low-rank tokens: rank must be between 1 and {max_rank}, got {rank}.")
    x = local_tokens.float()
    mean = x.mean(-1, keepdim=True)
    u, s, vh = _truncated_svd(x - mean, rank)
    return ((u * s[:, None, :]) @ vh + mean).to(local_tokens.dtype)


def _truncated_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (fewer if min(N, D) is smaller) of the exact SVD of ``x`` (B, N, D):
    U (B, N, r), S (B, r), Vᵀ (B, r, D)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _check_level(level: float) -> None:
    if not isinstance(level, numbers.Real) or not 0.0 <= float(level) <= 1.0:
        raise VDInputError(f"focus level must be a number between 0 (semantic) and 1 (style), got {level!r}.")
