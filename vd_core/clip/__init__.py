"""CLIP ViT-L/14 contexts (docs/algorithm.md §5): the text and image context encoder, its
preprocessing, its tokenizer and the loading of CLIP files."""

from .context import CLIPContextEncoder
from .loading import encoder_from_state_dict, load_clip
from .preprocess import CLIPImagePreprocessing
from .tokenizer import load_clip_tokenizer

__all__ = ["CLIPContextEncoder", "CLIPImagePreprocessing", "encoder_from_state_dict", "load_clip", "load_clip_tokenizer"]
