"""What the test-only node modules share: their category, the seed input, the display-name rule
and :class:`BuilderNode`, the shape of a node that makes one object from its inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CATEGORY = "sdn_test"
SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})


class BuilderNode:
    """A test node whose one output is ``make(**inputs)``.

    Subclasses set ``RETURN_TYPES`` (one type), ``REQUIRED`` / ``OPTIONAL`` (``INPUT_TYPES``
    sections, in widget order) and ``make`` (a staticmethod taking the inputs by name, or in
    that order when the node is called directly).
    """

    CATEGORY = CATEGORY
    FUNCTION = "build"
    REQUIRED: dict[str, Any] = {}
    OPTIONAL: dict[str, Any] = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": dict(cls.REQUIRED), "optional": dict(cls.OPTIONAL)}

    @staticmethod
    def make(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a BuilderNode sets make")

    def build(self, *args: Any, **kwargs: Any) -> tuple[Any]:
        return (self.make(*args, **kwargs),)


def display_names(node_ids: Iterable[str]) -> dict[str, str]:
    """``{node id: display name}``: ``SDNTest_X`` is shown as ``Test: X``."""
    return {node_id: node_id.replace("SDNTest_", "Test: ") for node_id in node_ids}
