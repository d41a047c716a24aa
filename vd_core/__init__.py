"""vd_core — a self-contained PyTorch implementation of Versatile Diffusion (Xu et al., arXiv 2211.08332).

It never imports ComfyUI. See docs/ARCHITECTURE.md for the map of modules.
"""
