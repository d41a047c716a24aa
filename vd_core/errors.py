"""Exceptions raised by vd_core. Every message names the file or input at fault and the fix."""


class VDError(Exception):
    """Base class of every error vd_core raises on purpose."""


class CheckpointError(VDError):
    """A model file is missing, unreadable, corrupt, unsafe, or not the kind of file expected."""


class VDInputError(VDError, ValueError):
    """A user-supplied value (image, mask, prompt, size, steps ...) cannot be used."""


class MissingPartError(VDError):
    """A flow needs a model part (diffuser half, CLIP, VAE, Optimus) that was not loaded."""


class TokenizerNotFoundError(VDError, FileNotFoundError):
    """Tokenizer files were not found in any searched location."""


class Cancelled(VDError):
    """The host asked to stop (a cancel check returned True) while sampling."""


class NumericalError(VDError):
    """A model computed NaN or infinite values (damaged weights, or an extreme setting)."""
