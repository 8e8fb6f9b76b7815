"""ComfyUI-SafeDenoiser: training-free safe generation for ComfyUI.

Loaded by ComfyUI from custom_nodes/. See README.md and CONTRIBUTING.md.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
