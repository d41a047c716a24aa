"""The four-flow diffuser of Versatile Diffusion (algorithm.md §1–4): model, config, parts, loading."""

from .config import DiffuserConfig
from .four_flow import ContextInput, DiffuserParts, FourFlowDiffuser
from .loading import load_diffuser, read_diffuser_state_dict

__all__ = [
    "ContextInput",
    "DiffuserConfig",
    "DiffuserParts",
    "FourFlowDiffuser",
    "load_diffuser",
    "read_diffuser_state_dict",
]
