"""The workflow a run repeats: an API prompt, its image outputs (the "arms"), the inputs a row sets.

A UI-format workflow (what the frontend saves, e.g. ``example_workflows/*.json``) is converted
with the pack's converter (``devtools/comfy/ui_workflow.py``) and the server's ``/object_info``; an API-format
one (the frontend's "Export (API)") is used as it is. Inputs are named ``NODE.INPUT`` where
``NODE`` is a node id, a node title or a class type that occurs once (``--set`` for constants,
``--prompt-input`` / ``--seed-input`` / ``--guidance-input`` for the row's values).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from devtools.comfy.ui_workflow import ui_to_api

IMAGE_OUTPUTS = ("SaveImage", "PreviewImage")


class WorkflowError(ValueError):
    """The workflow or an input name cannot be used (the message names it and the fix)."""


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _titles(ui: Optional[Mapping[str, Any]]) -> dict[str, str]:
    if not ui:
        return {}
    return {str(n["id"]): n["title"] for n in ui.get("nodes", []) if n.get("title")}


@dataclass
class Target:
    """One input of one node: ``node`` (API id) and ``name``."""

    node: str
    name: str

    def __str__(self) -> str:
        return f"{self.node}.{self.name}"


@dataclass
class Workflow:
    """The API prompt (reduced to the chosen outputs' ancestors), titles by node id, the outputs."""

    prompt: dict[str, Any]
    titles: dict[str, str]
    outputs: dict[str, str]  # arm name -> node id of its SaveImage / PreviewImage
    source: str

    @classmethod
    def load(cls, path: Path | str, object_info: Mapping[str, Any], outputs: Sequence[str] = ()) -> "Workflow":
        """Read ``path``; ``outputs`` (node ids or titles) choose the image outputs, default all."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise WorkflowError(f"workflow {path}: cannot read it as JSON ({exc})") from None
        ui = data if is_ui_workflow(data) else None
        prompt = ui_to_api(data, object_info) if ui else data
        if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
            raise WorkflowError(f"workflow {path}: neither a UI workflow (nodes/links) nor an API prompt")
        wf = cls(prompt=prompt, titles=_titles(ui), outputs={}, source=path.name)
        images = [k for k, v in prompt.items() if v["class_type"] in IMAGE_OUTPUTS]
        chosen = [wf.node(name, "output") for name in outputs] if outputs else images
        for node_id in chosen:
            if prompt[node_id]["class_type"] not in IMAGE_OUTPUTS:
                raise WorkflowError(f"output {wf.label(node_id)} is a {prompt[node_id]['class_type']}, not one of "
                                    f"{IMAGE_OUTPUTS}")
            wf.outputs[wf.titles.get(node_id, node_id)] = node_id
        if not wf.outputs:
            raise WorkflowError(f"workflow {path}: no {' or '.join(IMAGE_OUTPUTS)} node to take images from")
        keep = wf._ancestors(list(wf.outputs.values()))
        wf.prompt = {k: v for k, v in prompt.items() if k in keep}
        return wf

    def label(self, node_id: str) -> str:
        title = self.titles.get(node_id)
        return f"node {node_id}" + (f" ({title!r})" if title else "")

    def node(self, name: str, what: str) -> str:
        """The API id of the node a user named by id, title or unique class type."""
        if name in self.prompt:
            return name
        by_title = [k for k, t in self.titles.items() if t == name and k in self.prompt]
        by_class = [k for k, v in self.prompt.items() if v["class_type"] == name]
        for found in (by_title, by_class):
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise WorkflowError(f"{what} {name!r} matches nodes {found}; name one by id")
        known = ", ".join(f"{k} {self.titles.get(k, v['class_type'])!r}" for k, v in self.prompt.items())
        raise WorkflowError(f"{what} {name!r} is no node id, title or class type of {self.source}; nodes: {known}")

    def target(self, spec: str, what: str) -> Target:
        """``NODE.INPUT`` -> :class:`Target` (split at the last dot, so titles may hold dots)."""
        node, sep, name = spec.rpartition(".")
        if not sep or not node or not name:
            raise WorkflowError(f"{what} {spec!r} must be NODE.INPUT (a node id, title or class type, a dot, the "
                                "input's name), e.g. 6.seed or 'CLIP Text Encode (Prompt).text'")
        node_id = self.node(node, what)
        inputs = self.prompt[node_id]["inputs"]
        if name not in inputs:
            raise WorkflowError(f"{what} {spec!r}: {self.label(node_id)} has no input {name!r}; inputs: {sorted(inputs)}")
        if isinstance(inputs[name], list):
            raise WorkflowError(f"{what} {spec!r}: input {name!r} of {self.label(node_id)} is linked to another node; "
                                "name a widget input (a value), e.g. the text of a CLIP Text Encode")
        return Target(node_id, name)

    def _ancestors(self, roots: list[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in self.prompt:
                continue
            seen.add(node_id)
            for value in self.prompt[node_id]["inputs"].values():
                if isinstance(value, list) and len(value) == 2:
                    stack.append(str(value[0]))
        return seen

    def instance(self, values: Mapping[str, tuple[Sequence[Target], Any]], prefix: str) -> dict[str, Any]:
        """A copy of the prompt with each ``(targets, value)`` set; every Save Image output becomes a
        Preview Image (the images go to the server's temp folder, which it clears, and this tool
        keeps its own copies). ``prefix`` is kept for workflows whose outputs need one."""
        prompt = copy.deepcopy(self.prompt)
        for targets, value in values.values():
            for t in targets:
                prompt[t.node]["inputs"][t.name] = value
        for node_id in self.outputs.values():
            if prompt[node_id]["class_type"] == "SaveImage":
                prompt[node_id] = {"class_type": "PreviewImage", "inputs": {"images": prompt[node_id]["inputs"]["images"]}}
        return prompt

    def fingerprint(self) -> str:
        """SHA-256 of the reduced prompt (what a resumed run must match)."""
        return hashlib.sha256(json.dumps(self.prompt, sort_keys=True).encode("utf-8")).hexdigest()


def parse_constant(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, quoted strings), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
