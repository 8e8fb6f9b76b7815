"""UI (litegraph) workflows in the tests: conversion to API prompts, structural checks, rewrites.

The converter is the pack's (:mod:`devtools.comfy.ui_workflow`, shared with the demo; its docstring
lists the frontend's rules it implements) and is re-exported here: :func:`ui_to_api`,
:func:`is_widget`, :func:`extra_widget_values`, :class:`WorkflowConversionError`.  Node
definitions come from a server's ``/object_info`` or :meth:`harness.runtime.ComfySession.object_info`.

Also here: :func:`check_ui_workflow` (structural checks of a UI workflow file),
:func:`widget_slots` (how many ``widgets_values`` a node type stores), and helpers that rewrite
a converted API prompt for tests (:func:`substitute_tiny`, :func:`nodes_of_type`,
:func:`set_inputs`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devtools.comfy import ui_workflow as _ui

from .locate import REPO_ROOT

log = logging.getLogger(__name__)

# The converter itself is the pack's (devtools/comfy/ui_workflow.py, shared with the demo runner).
MODE_MUTED: int = _ui.MODE_MUTED
MODE_BYPASSED: int = _ui.MODE_BYPASSED
VIRTUAL_NODES: frozenset[str] = _ui.VIRTUAL_NODES
WIDGET_TYPES: frozenset[str] = _ui.WIDGET_TYPES
SEED_NAMES: frozenset[str] = _ui.SEED_NAMES
EXAMPLE_WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
WorkflowConversionError = _ui.WorkflowConversionError
is_widget = _ui.is_widget
extra_widget_values = _ui.extra_widget_values
ui_to_api = _ui.ui_to_api
_ordered_inputs = _ui.ordered_inputs
_links_table = _ui.links_table


def example_workflows() -> list[Path]:
    """The pack's shipped workflows, ``example_workflows/*.json``, sorted by name."""
    return sorted(EXAMPLE_WORKFLOWS_DIR.glob("*.json"))


def load_ui_workflow(path: Path) -> dict[str, Any]:
    """A workflow file parsed as JSON (UTF-8)."""
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


def widget_slots(definition: Mapping[str, Any]) -> int:
    """How many ``widgets_values`` entries the frontend stores for a node of this definition."""
    return sum(1 + extra_widget_values(name, spec)
               for name, spec in _ordered_inputs(definition) if is_widget(spec))


def check_ui_workflow(workflow: Any, object_info: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Problems of a UI-format (litegraph) workflow; an empty list means it is well formed.

    Checks: the top-level shape (``nodes``/``links`` lists, ``last_node_id``/``last_link_id`` not
    below the ids used), unique node ids, every non-virtual node type known to ``object_info``,
    list-form ``widgets_values`` of exactly :func:`widget_slots` entries, and every link joining
    existing nodes' slots consistently on both ends (origin ``outputs[slot].links`` holds it,
    target ``inputs[slot].link`` is it, and the types agree).
    """
    if not isinstance(workflow, Mapping):
        return [f"a UI workflow is a JSON object, got {type(workflow).__name__}"]
    nodes, raw_links = workflow.get("nodes"), workflow.get("links")
    if not isinstance(nodes, list) or not isinstance(raw_links, list):
        return ["a UI workflow has 'nodes' and 'links' lists (is this an API-format prompt?)"]
    problems: list[str] = []
    by_id: dict[int, Mapping[str, Any]] = {}
    for node in nodes:
        if not isinstance(node, Mapping) or "id" not in node or "type" not in node:
            problems.append(f"node without id/type: {node!r:.80}")
            continue
        if int(node["id"]) in by_id:
            problems.append(f"node id {node['id']} is used twice")
        by_id[int(node["id"])] = node
        node_type = node["type"]
        if node_type in VIRTUAL_NODES:
            continue
        definition = object_info.get(node_type)
        if definition is None:
            problems.append(f"node {node['id']}: type {node_type!r} is not in object_info")
            continue
        values = node.get("widgets_values")
        if isinstance(values, list) and len(values) != widget_slots(definition):
            problems.append(f"node {node['id']} ({node_type}): {len(values)} widgets_values, its "
                            f"INPUT_TYPES has {widget_slots(definition)} widget slots")
    try:
        links = _links_table(workflow)
    except (KeyError, TypeError, ValueError) as err:
        return problems + [f"malformed links: {err!r}"]
    if by_id and int(workflow.get("last_node_id", max(by_id))) < max(by_id):
        problems.append(f"last_node_id {workflow.get('last_node_id')} < highest node id {max(by_id)}")
    if links and int(workflow.get("last_link_id", max(links))) < max(links):
        problems.append(f"last_link_id {workflow.get('last_link_id')} < highest link id {max(links)}")
    for link_id, (origin_id, origin_slot, target_id, target_slot, kind) in links.items():
        origin, target = by_id.get(origin_id), by_id.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id} joins missing node {origin_id if origin is None else target_id}")
            continue
        outputs, inputs = origin.get("outputs") or [], target.get("inputs") or []
        if origin_slot >= len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed in node {origin_id}'s output {origin_slot}")
        elif outputs[origin_slot].get("type") not in (kind, "*"):
            problems.append(f"link {link_id} of type {kind!r} leaves an output of type "
                            f"{outputs[origin_slot].get('type')!r}")
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not node {target_id}'s input {target_slot}")
        elif inputs[target_slot].get("type") not in (kind, "*"):
            problems.append(f"link {link_id} of type {kind!r} enters an input of type "
                            f"{inputs[target_slot].get('type')!r}")
    return problems


#: API-prompt rewrites of :func:`substitute_tiny`: real loader/encoder -> test-only tiny node,
#: with the inputs to drop.  Output slots match, so links into the rest of the graph stay valid.
TINY_SUBSTITUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "CheckpointLoaderSimple": ("SDNTest_TinyCheckpoint", ("ckpt_name",)),
    "CLIPTextEncode": ("SDNTest_TinyTextEncode", ()),
}


def substitute_tiny(api_prompt: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of ``api_prompt`` with real checkpoints/text encoders replaced by tiny test nodes.

    ``CheckpointLoaderSimple`` -> ``SDNTest_TinyCheckpoint`` (``ckpt_name`` dropped),
    ``CLIPTextEncode`` -> ``SDNTest_TinyTextEncode`` (same inputs); everything else is kept.
    """
    result: dict[str, dict[str, Any]] = copy.deepcopy(dict(api_prompt))  # type: ignore[arg-type]
    for node in result.values():
        substitute = TINY_SUBSTITUTES.get(node.get("class_type", ""))
        if substitute is not None:
            node["class_type"], dropped = substitute
            for name in dropped:
                node["inputs"].pop(name, None)
    return result


def nodes_of_type(api_prompt: Mapping[str, Mapping[str, Any]], class_type: str) -> list[str]:
    """Ids of the API prompt's nodes of ``class_type``, in prompt order."""
    return [node_id for node_id, node in api_prompt.items() if node.get("class_type") == class_type]


def set_inputs(api_prompt: dict[str, dict[str, Any]], class_type: str, **values: Any) -> list[str]:
    """Set ``values`` on every node of ``class_type`` (in place); return their ids, raise if none."""
    found = nodes_of_type(api_prompt, class_type)
    if not found:
        present = sorted({node["class_type"] for node in api_prompt.values()})
        raise KeyError(f"the prompt has no {class_type} node (has {present})")
    for node_id in found:
        api_prompt[node_id]["inputs"].update(values)
    return found
