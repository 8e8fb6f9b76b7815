"""Test-only nodes for the concept-erasure features: a tiny REAL CLIP (``comfy.sd.CLIP`` built
by :mod:`harness.erasure_models`), whose 32-dim token embeddings condition the tiny UNets. The
package's ``__init__`` adds ``NODE_CLASS_MAPPINGS`` to its own."""

from __future__ import annotations

from harness import erasure_models

from .common import SEED, BuilderNode


class ErasureCLIP(BuilderNode):
    """A tiny real ComfyUI CLIP (SD1 tokenizer, 2-layer CLIP-L text encoder, 32 wide for the tiny
    UNets or :data:`harness.erasure_models.WIDE`)."""

    RETURN_TYPES = ("CLIP",)
    REQUIRED = {"seed": SEED, "hidden": ([32, erasure_models.WIDE],)}
    make = staticmethod(erasure_models.build_text_encoder)


NODE_CLASS_MAPPINGS = {"SDNTest_ErasureCLIP": ErasureCLIP}
