"""Text variation (algorithm.md §8 "Text-Variation"): CLIP-text(prompt) against CLIP-text(""), text flow,
Optimus decode."""

from __future__ import annotations

import torch

from .context_builders import text_context
from .options import SamplingOptions
from .result import decode_texts
from .sampling import check_count, make_noise, sample_text


@torch.no_grad()
def text_variation(
    models,
    prompt: str,
    n: int = 4,
    clean_up: bool = True,
    options: SamplingOptions | None = None,
    negative: str = "",
) -> list[str]:
    """Sample ``n`` sentences related to ``prompt``.

    Args:
        models: ``VDModels`` with the diffuser, CLIP and Optimus.
        prompt: the sentence to vary; negative: the unconditional prompt (the WebUI's is "").
        n: number of sentences (the WebUI's 4).
        clean_up: remove immediately repeated words/phrases (algorithm.md §8.3).
        options: sampling options (official defaults when ``None``).

    Returns:
        ``n`` strings.
    """
    options = options or SamplingOptions()
    purpose = "text variation"
    check_count(n)
    diffuser = models.require("diffuser", purpose)
    clip = models.require("clip", purpose)
    optimus = models.require("optimus", purpose)
    noise = make_noise(options, n)
    latents = sample_text(diffuser, [text_context(clip, prompt, negative)], n=n, options=options, noise=noise)
    return decode_texts(optimus, latents, noise, clean_up)
