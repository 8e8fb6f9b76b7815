"""Convert a UI (litegraph) workflow JSON into an API prompt, like the frontend's graphToPrompt.

ComfyUI has no backend converter; example workflows are saved in UI format and ``/prompt``
takes API format.  Conversion needs node definitions shaped like ``/object_info`` (from a
server's ``GET /object_info``, or built in-process).  Used by the demo runner to run
``example_workflows/digits_demo.json`` and by the test harness (``tests/harness/workflow.py``
re-exports it).  Imports only the standard library.

Rules implemented (checked against both ComfyUI versions' frontends):

* muted (mode 2) and bypassed (mode 4) nodes are left out; a link from a bypassed node is
  followed through the bypassed node's input of the same type (the input at the link's slot
  first, then any input), a link from a muted node is dropped;
* virtual nodes are left out: ``Note``/``MarkdownNote``, ``Reroute`` (links are followed
  through it) and ``PrimitiveNode`` (its widget value is used for the inputs it feeds);
* widget inputs (``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, ``COMBO`` or a combo list, not
  ``forceInput``) are walked in ``INPUT_TYPES`` order, required then optional; each consumes one
  ``widgets_values`` entry, even when it is linked; seed-like ``INT`` inputs (named ``seed`` /
  ``noise_seed`` or with ``control_after_generate``) consume one more (the control value) and
  ``image_upload`` combos one more (the upload button);
* a link into an input overrides its widget value;
* ``widgets_values`` given as a dict (some newer frontend nodes) is read by input name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MODE_MUTED = 2
MODE_BYPASSED = 4
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})


class WorkflowConversionError(ValueError):
    """The UI workflow cannot be converted (unknown node type, too few widget values, ...)."""


def _spec_options(spec: Any) -> dict[str, Any]:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], Mapping):
        return dict(spec[1])
    return {}


def is_widget(spec: Any) -> bool:
    """Whether an ``INPUT_TYPES`` entry is shown as a widget (and so has a ``widgets_values`` slot)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    if _spec_options(spec).get("forceInput"):
        return False
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def widget_default(spec: Any, missing: str) -> Any:
    """The value a widget shows when a saved workflow has none for it: its ``default``, else a
    combo's first choice (the frontend's rule).

    Raises:
        WorkflowConversionError: ``missing`` when the input has neither.
    """
    options = _spec_options(spec)
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], (list, tuple)) and spec[0]:
        return spec[0][0]
    raise WorkflowConversionError(missing)


def extra_widget_values(name: str, spec: Any) -> int:
    """How many extra ``widgets_values`` entries the frontend stores after this widget."""
    options = _spec_options(spec)
    if spec[0] == "INT" and (name in SEED_NAMES or options.get("control_after_generate")):
        return 1
    if options.get("image_upload"):
        return 1
    return 0


def ordered_inputs(definition: Mapping[str, Any]) -> list[tuple[str, Any]]:
    inputs = definition.get("input", {})
    order = definition.get("input_order") or {}
    result: list[tuple[str, Any]] = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or list(specs):
            result.append((name, specs[name]))
    return result


def links_table(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int, int, int, Any]]:
    table: dict[int, tuple[int, int, int, int, Any]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, Mapping):  # newer serialisation
            link_id = int(link["id"])
            table[link_id] = (int(link["origin_id"]), int(link["origin_slot"]),
                              int(link["target_id"]), int(link["target_slot"]), link.get("type"))
        else:
            link_id, origin, origin_slot, target, target_slot, kind = link[:6]
            table[int(link_id)] = (int(origin), int(origin_slot), int(target), int(target_slot), kind)
    return table


class _Converter:
    def __init__(self, workflow: Mapping[str, Any], object_info: Mapping[str, Mapping[str, Any]]):
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowConversionError("workflows with subgraphs are not supported")
        self.object_info = object_info
        self.nodes = {int(n["id"]): n for n in workflow.get("nodes") or []}
        self.links = links_table(workflow)

    def resolve(self, link_id: int | None, want_type: Any, seen: frozenset[int] = frozenset()) -> Any:
        """``[origin_id, slot]`` or a primitive's value for a link, following virtual/bypassed nodes;
        ``None`` when the link leads nowhere (missing, from a muted node)."""
        if link_id is None or link_id in seen or link_id not in self.links:
            return None
        origin_id, origin_slot, _target, _slot, _kind = self.links[link_id]
        seen = seen | {link_id}
        origin = self.nodes.get(origin_id)
        if origin is None:
            return None
        node_type, mode = origin.get("type"), origin.get("mode", 0)
        if node_type == "Reroute":
            inputs = origin.get("inputs") or [{}]
            return self.resolve(inputs[0].get("link"), want_type, seen)
        if node_type == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowConversionError(f"PrimitiveNode {origin_id} has no value")
            return {"value": values[0]}
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            inputs = origin.get("inputs") or []
            candidates = ([origin_slot] if origin_slot < len(inputs) else []) + list(range(len(inputs)))
            for index in candidates:
                if inputs[index].get("type") == want_type:
                    return self.resolve(inputs[index].get("link"), want_type, seen)
            return None
        return [str(origin_id), origin_slot]

    def convert_node(self, node: Mapping[str, Any]) -> dict[str, Any]:
        node_id, node_type = node["id"], node["type"]
        definition = self.object_info.get(node_type)
        if definition is None:
            raise WorkflowConversionError(f"node {node_id}: unknown node type {node_type!r}")
        raw_values = node.get("widgets_values")
        values_by_name = raw_values if isinstance(raw_values, Mapping) else None
        values = list(raw_values or []) if values_by_name is None else []
        linked = {i.get("name"): i for i in node.get("inputs") or [] if i.get("link") is not None}
        inputs: dict[str, Any] = {}
        position = 0
        for name, spec in ordered_inputs(definition):
            if is_widget(spec):
                if values_by_name is not None:
                    if name in values_by_name:
                        inputs[name] = values_by_name[name]
                elif position < len(values):
                    inputs[name] = values[position]
                elif name not in linked:  # saved before the node had this widget: the frontend keeps its default
                    inputs[name] = widget_default(spec, f"node {node_id} ({node_type}): no widgets_values entry for "
                                                        f"{name!r} (has {len(values)}) and the input has no default")
                position += 1 + extra_widget_values(name, spec)
            if name in linked:
                source = self.resolve(linked[name]["link"], linked[name].get("type"))
                if isinstance(source, dict):  # a PrimitiveNode's value
                    inputs[name] = source["value"]
                elif source is not None:
                    inputs[name] = source
                elif not is_widget(spec):
                    inputs.pop(name, None)
        if values_by_name is None and position < len(values):
            log.debug("node %s (%s): %d widgets_values left over", node_id, node_type, len(values) - position)
        return {"class_type": node_type, "inputs": inputs}

    def convert(self) -> dict[str, dict[str, Any]]:
        prompt: dict[str, dict[str, Any]] = {}
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if node.get("type") in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
                continue
            prompt[str(node_id)] = self.convert_node(node)
        return prompt


def ui_to_api(workflow: Mapping[str, Any],
              object_info: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The API prompt ``{node_id: {"class_type", "inputs"}}`` of a UI-format workflow."""
    return _Converter(workflow, object_info).convert()
