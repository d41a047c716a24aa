"""Classifier-free guidance (algorithm.md §7.3): turn the diffuser and its contexts into ``eps(x, t)``.

With scale exactly 1 the diffuser runs once on the conditional contexts. Otherwise it runs once
on the doubled batch ``x_in = [x; x]``, ``t_in = [t; t]`` with every context entry ``[u_i; c_i]``
(unconditional first, as the official sampler concatenates them) and
``ε = ε_u + s·(ε_c − ε_u)``. With several contexts the diffuser mixes the unconditional halves
with the same ratios as the conditional ones (algorithm.md §4.3), so one formula covers multi-context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import VDInputError

if TYPE_CHECKING:
    from ..diffuser import ContextInput

# ``diffuser(x, t, contexts) -> eps``: x (B, ...) data, t (B,) timesteps, contexts a sequence of
# ContextInput(kind, tokens (B, N, D), ratio).
Diffuser = Callable[[torch.Tensor, torch.Tensor, Sequence["ContextInput"]], torch.Tensor]


def _to_batch(tokens: torch.Tensor, batch: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """``(1 | B, N, D)`` tokens as ``(B, N, D)`` on ``like``'s device and dtype (batch 1 is expanded,
    not copied)."""
    if tokens.shape[0] not in (1, batch):
        raise VDInputError(
            f"{what} tokens have batch {tokens.shape[0]} but the sample has batch {batch}; "
            "give contexts with batch 1 (shared) or one per sample"
        )
    return tokens.to(device=like.device, dtype=like.dtype).expand(batch, *tokens.shape[1:])


class GuidedEps:
    """``eps(x, t)`` with classifier-free guidance applied; build one per sampling run.

    Args:
        diffuser: ``diffuser(x, t, contexts) -> eps`` (``FourFlowDiffuser``).
        cond: conditional context entries, ``ContextInput(kind, tokens (1|B, N, D), ratio)``.
        uncond: the unconditional entry for each ``cond`` entry (same order, kinds and token
            shapes); may be ``None`` only when ``scale == 1``. Its ratios are ignored: each
            ``[u_i; c_i]`` pair takes ``cond[i].ratio``.
        scale: guidance scale ``s``; exactly 1 runs the diffuser once, without ``uncond``.

    Calling it with ``x (B, ...)`` and ``t (B,)`` returns ``ε`` shaped like ``x``. The (doubled)
    context tensors are built on the first call and reused for every later step of the run.
    """

    def __init__(
        self,
        diffuser: Diffuser,
        cond: Sequence["ContextInput"],
        uncond: Sequence["ContextInput"] | None,
        scale: float,
    ):
        if len(cond) == 0:
            raise VDInputError("guidance needs at least one conditional context")
        if scale != 1.0:
            if uncond is None:
                raise VDInputError(
                    f"guidance scale {scale} needs unconditional contexts; pass uncond or use scale 1"
                )
            if len(uncond) != len(cond):
                raise VDInputError(
                    f"{len(cond)} conditional contexts but {len(uncond)} unconditional ones; "
                    "give one unconditional entry per context"
                )
            for i, (c, u) in enumerate(zip(cond, uncond)):
                if c.kind != u.kind or c.tokens.shape[1:] != u.tokens.shape[1:]:
                    raise VDInputError(
                        f"context {i}: conditional {c.kind} {tuple(c.tokens.shape)} and unconditional "
                        f"{u.kind} {tuple(u.tokens.shape)} must have the same kind, N and D"
                    )
        self.diffuser = diffuser
        self.cond = tuple(cond)
        self.uncond = None if uncond is None else tuple(uncond)
        self.scale = float(scale)
        self._contexts: tuple | None = None
        self._batch: int | None = None

    def _contexts_for(self, x: torch.Tensor) -> tuple:
        batch = x.shape[0]
        if self._batch != batch:
            if self.scale == 1.0:
                contexts = tuple(
                    c._replace(tokens=_to_batch(c.tokens, batch, x, f"context {i} ({c.kind})"))
                    for i, c in enumerate(self.cond)
                )
            else:
                contexts = tuple(
                    c._replace(
                        tokens=torch.cat(
                            [
                                _to_batch(u.tokens, batch, x, f"unconditional context {i} ({u.kind})"),
                                _to_batch(c.tokens, batch, x, f"context {i} ({c.kind})"),
                            ]
                        )
                    )
                    for i, (c, u) in enumerate(zip(self.cond, self.uncond))
                )
            self._contexts, self._batch = contexts, batch
        return self._contexts

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x (B, ...)``, ``t (B,)`` → guided ``ε`` shaped like ``x``."""
        contexts = self._contexts_for(x)
        if self.scale == 1.0:
            return self.diffuser(x, t, contexts)
        eps_uncond, eps_cond = self.diffuser(torch.cat([x, x]), torch.cat([t, t]), contexts).chunk(2)
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
