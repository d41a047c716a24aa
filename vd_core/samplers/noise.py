"""Noise sources: where every random normal draw of a sampling run comes from.

A sampler never calls ``torch.randn`` itself; it asks its ``NoiseSource`` for a tensor shaped like
the sample. Two policies:

* :class:`BatchNoise` — one CPU generator draws each tensor over the whole batch in float32. This
  is the official order (algorithm.md §7.4: the WebUI calls ``torch.manual_seed(seed + 100)`` and then
  draws the initial latent and one ``randn_like`` per DDIM step over the batch), so
  ``BatchNoise(s)(torch.empty(shape))`` equals ``torch.manual_seed(s); torch.randn(shape)``, and a
  CPU run and a GPU run see the same numbers.
* :class:`PerItemNoise` — batch row ``i`` comes from its own generator (ComfyUI's rule: item ``i``
  of a batch equals a single-item run with seed ``seeds[i]``).

Neither touches the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from ..errors import VDInputError
from ..validation import generator_seed


@runtime_checkable
class NoiseSource(Protocol):
    """``noise(like) -> n``: standard-normal noise with ``like``'s shape, dtype and device.

    ``split(n)`` says which generator serves which rows of an ``n``-row batch, in draw order, for
    the other draws of a run (VAE posterior samples, Optimus word sampling) that continue the
    same generators: ``[(rows: slice, generator), …]``.
    """

    def __call__(self, like: torch.Tensor) -> torch.Tensor: ...

    def split(self, n: int) -> list[tuple[slice, torch.Generator]]: ...


def _generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator(device="cpu").manual_seed(generator_seed(seed_or_generator))


def _draw(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Draw in float32 on the generator's device, then move/cast: the numbers do not depend on the
    # sample's device or precision.
    n = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=generator.device)
    if n.device.type == "cpu" and like.device.type == "cuda":
        # A pinned, non-blocking copy: the sampling loop does not wait for the GPU to catch up.
        n = n.pin_memory().to(like.device, non_blocking=True)
    return n.to(device=like.device, dtype=like.dtype)


class BatchNoise:
    """Every draw covers the whole batch from one generator (the official order).

    Args:
        seed_or_generator: an ``int`` seed (a fresh CPU ``torch.Generator`` is made) or a
            generator to continue drawing from.
    """

    def __init__(self, seed_or_generator: int | torch.Generator):
        self.generator = _generator(seed_or_generator)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return _draw(like.shape, self.generator, like)

    def split(self, n: int) -> list[tuple[slice, torch.Generator]]:
        """The whole batch from the one generator."""
        return [(slice(0, n), self.generator)]


class PerItemNoise:
    """Batch row ``i`` of every draw comes from its own generator seeded ``seeds[i]``.

    Args:
        seeds: one seed per batch item; every tensor drawn must have ``len(seeds)`` rows.
    """

    def __init__(self, seeds: Sequence[int]):
        if len(seeds) == 0:
            raise VDInputError("PerItemNoise needs at least one seed (one per batch item)")
        self.generators = [_generator(seed) for seed in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.dim() == 0 or like.shape[0] != len(self.generators):
            raise VDInputError(
                f"PerItemNoise has {len(self.generators)} seeds but was asked for noise of shape "
                f"{tuple(like.shape)}; give one seed per batch item"
            )
        rows = [_draw(like.shape[1:], g, like) for g in self.generators]
        return torch.stack(rows)

    def split(self, n: int) -> list[tuple[slice, torch.Generator]]:
        """Row ``i`` from generator ``i``."""
        if n != len(self.generators):
            raise VDInputError(f"PerItemNoise has {len(self.generators)} seeds for a batch of {n}; give one seed per item")
        return [(slice(i, i + 1), g) for i, g in enumerate(self.generators)]
