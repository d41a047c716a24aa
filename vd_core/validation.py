"""Checks of user-supplied values at vd_core's boundaries, one rule each (used by the flows, the
samplers, the CLI and the ComfyUI nodes).

* Numbers: NaN/inf never pass silently — :func:`check_finite` for tensors the user gives,
  :func:`check_finite_number` for scalars (guidance, strengths, weights), :func:`check_result` for
  what a model computed, before it is returned or written (NaN there means damaged weights or an
  extreme setting, never a user's tensor).
* Images and masks: :func:`check_image_values` refuses NaN and values far outside [0, 1]
  (0…255 data that was not divided by 255, or −1…1 data) *before* a resize would clamp them.
* Seeds: :func:`check_seed` accepts ComfyUI's whole range 0…2⁶⁴−1; :func:`generator_seed` is the
  one rule that turns a seed plus an offset (the WebUI's ``seed + 100``, ComfyUI's ``seed + i``)
  into a ``torch.Generator`` seed: it wraps modulo 2⁶⁴, as the frontend's seed widget does.
* Devices: :func:`check_device` turns ``"cpu"``, ``"cuda:1"`` … into a usable ``torch.device``.
"""

from __future__ import annotations

import math

import torch

from .errors import NumericalError, VDInputError

SEED_RANGE = 2**64  # ComfyUI's seed widget: 0 … 0xffffffffffffffff; torch.Generator takes the same range
MAX_SEED = SEED_RANGE - 1

# Resampling filters (bicubic, Lanczos) overshoot [0, 1] a little near edges; such values are
# clamped. Data in 0…255 or −1…1 lies far outside this slack and is refused.
IMAGE_RANGE_SLACK = 0.25

DAMAGED_WEIGHTS = (
    "the model weights are probably damaged (NaN/inf in the file: download it again) or a setting is extreme "
    "(guidance, strengths); try the official defaults"
)


def check_finite(tensor: torch.Tensor, what: str, fix: str = "") -> None:
    """Raise :class:`VDInputError` when the user's ``tensor`` holds NaN or ±inf.

    Args:
        what: names the input ("init latent", "mask of image slot 2" …); ``fix`` is appended.
    """
    if not isinstance(tensor, torch.Tensor):
        raise VDInputError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    bad = _count_non_finite(tensor)
    if bad:
        raise VDInputError(
            f"{what} contains {bad} NaN or infinite value(s) of {tensor.numel()}; "
            + (fix or "it was probably produced by a failed computation upstream: recreate it")
        )


def check_finite_number(value, what: str, fix: str = "") -> float:
    """``float(value)``, raising :class:`VDInputError` for non-numbers, NaN and ±inf."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VDInputError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise VDInputError(f"{what} must be a finite number, got {value!r}" + (f"; {fix}" if fix else ""))
    return number


def check_result(tensor: torch.Tensor, what: str, cause: str = DAMAGED_WEIGHTS) -> torch.Tensor:
    """Return ``tensor`` when finite, else raise :class:`NumericalError` naming ``what`` and the
    likely ``cause``. For values a model computed (latents, images), checked before they are
    returned or written: a black or NaN image must never pass as a result."""
    bad = _count_non_finite(tensor)
    if bad:
        raise NumericalError(f"{what} came out with {bad} NaN or infinite value(s) of {tensor.numel()}: {cause}")
    return tensor


def check_image_values(images: torch.Tensor, what: str = "image") -> None:
    """Refuse NaN/inf and values outside [0, 1] by more than ``IMAGE_RANGE_SLACK``.

    Call it before any resize or 8-bit conversion (those clamp, which would hide the mistake).
    """
    check_finite(images, what, "images must hold finite values in [0, 1]; check how it was made")
    if images.numel() == 0:
        raise VDInputError(f"{what} is empty (shape {tuple(images.shape)})")
    low, high = images.min().item(), images.max().item()
    if high > 1 + IMAGE_RANGE_SLACK:
        hint = "divide by 255" if high <= 255 + IMAGE_RANGE_SLACK else "rescale it"
        raise VDInputError(f"{what} has values up to {high:g}; images must be in [0, 1]: {hint}")
    if low < -IMAGE_RANGE_SLACK:
        hint = "map −1…1 data with (x + 1) / 2" if low >= -1 - IMAGE_RANGE_SLACK else "rescale it"
        raise VDInputError(f"{what} has values down to {low:g}; images must be in [0, 1]: {hint}")


def check_seed(seed, what: str = "seed") -> int:
    """A seed as ``int``: a whole number in 0 … 2⁶⁴−1 (ComfyUI's range), else :class:`VDInputError`."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        else:
            raise VDInputError(f"{what} must be a whole number in 0 … {MAX_SEED}, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise VDInputError(f"{what} must be in 0 … {MAX_SEED} (2**64 − 1, ComfyUI's range), got {seed}")
    return int(seed)


def generator_seed(seed: int, offset: int = 0) -> int:
    """The ``torch.Generator`` seed for ``seed + offset``, wrapped modulo 2⁶⁴ so that every seed of
    the range, plus any offset, is a valid generator seed (``Overflow when unpacking long long``
    otherwise). Unchanged for every sum below 2⁶⁴, so official seeds keep their noise."""
    return (int(seed) + int(offset)) % SEED_RANGE


def check_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` … as a ``torch.device`` that exists here.

    Raises:
        VDInputError: an unknown name, or a CUDA/MPS device this machine does not have.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise VDInputError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N (N = GPU number) or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise VDInputError(
                f"device {str(device)!r}: CUDA is not available here (no NVIDIA GPU, or this PyTorch was built "
                "without CUDA); use --device cpu or install a CUDA build of PyTorch"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise VDInputError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0 … cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise VDInputError(f"device {str(device)!r}: Apple MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise VDInputError(f"unsupported device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    return parsed


def _count_non_finite(tensor: torch.Tensor) -> int:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor)).sum().item())
