"""ComfyUI-SafeDenoiser: training-free safe generation for ComfyUI.

Loaded by ComfyUI from custom_nodes/. See README.md and CONTRIBUTING.md.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Frontend extensions (served under /extensions/<pack folder>/).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
