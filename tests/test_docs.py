"""What users read inside ComfyUI: a help page per node (``web/docs/<NodeID>.md``, served under
``/extensions/<pack>/docs/``), ``locales/en`` generated from the node definitions, search aliases,
example-workflow thumbnails and the registry's metadata (icon, URLs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from harness.locate import REPO_ROOT as PACK_ROOT, pack_file

node_docs = pack_file("devtools/node_docs.py", "sdn_node_docs")

REGEN = "python -m devtools.node_docs"


@pytest.fixture(scope="module")
def pack_nodes(comfy):
    return node_docs.pack_nodes(comfy.nodes.NODE_CLASS_MAPPINGS, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)


def test_every_node_has_a_help_page_in_step_with_its_definition(pack_nodes):
    classes, names = pack_nodes
    assert len(classes) >= 12
    for node_id, cls in classes.items():
        path = PACK_ROOT / "web" / "docs" / f"{node_id}.md"
        assert path.is_file(), f"no help page for {node_id}: write {path.name} and run `{REGEN}`"
        text = path.read_text(encoding="utf-8")
        assert text == node_docs.help_page(text, cls), f"{path.name} is out of date: run `{REGEN}`"
        prose = text[:text.index(node_docs.BEGIN)]
        assert prose.startswith(f"# {names[node_id]}\n"), path.name
        assert "## Example" in prose and len(prose.split()) >= 60, f"{path.name}: say what it does, with an example"
        for name, _, _ in node_docs._inputs(cls):
            assert f"| `{name}` |" in text


PICTURED = ("SDN_SafeDenoiserKSampler", "SDN_SafeDenoiserPatch", "SDN_SafeDenoiserRestartSampler",
            "SDN_NudityRewardPreview", "SDN_EraseConceptSDD", "SDN_LoadConceptErasedModel")
"""Help pages where a picture says more: each shows one made from the pack's own runs."""
PICTURES_MAX_BYTES = 400_000


def test_help_page_pictures_exist_under_the_served_docs_and_stay_small():
    docs = PACK_ROOT / "web" / "docs"
    used: set[Path] = set()
    for page in sorted(docs.glob("*.md")):
        for src in node_docs.help_page_images(page.read_text(encoding="utf-8")):
            assert not re.match(r"^([a-z][a-z0-9+.-]*:|/|#|\?)", src, re.I), \
                f"{page.name}: {src} must be relative (resolved against /extensions/<pack>/docs/)"
            path = (docs / src).resolve()
            assert path.is_relative_to(docs.resolve()), f"{page.name}: {src} leaves web/docs (not served)"
            assert path.is_file(), f"{page.name}: {src} does not exist"
            with Image.open(path) as im:
                assert im.format in ("JPEG", "PNG") and max(im.size) <= 1000, (src, im.format, im.size)
            used.add(path)
    for node_id in PICTURED:
        assert node_docs.help_page_images((docs / f"{node_id}.md").read_text(encoding="utf-8")), \
            f"{node_id}.md has no picture"
    shipped = {p.resolve() for p in (docs / "images").iterdir()}
    assert shipped == used, f"pictures no help page shows: {sorted(p.name for p in shipped - used)}"
    total = sum(p.stat().st_size for p in shipped)
    assert total <= PICTURES_MAX_BYTES, f"web/docs/images holds {total} bytes: shrink them (devtools/help_images.py)"


def test_locales_are_generated_from_the_nodes(pack_nodes):
    classes, names = pack_nodes
    for name, text in node_docs.locales(classes, names).items():
        path = PACK_ROOT / "locales" / "en" / name
        assert path.is_file() and path.read_text(encoding="utf-8") == text, f"{name} is out of date: run `{REGEN}`"
    defs = json.loads((PACK_ROOT / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    for node_id, cls in classes.items():
        assert defs[node_id]["display_name"] == names[node_id] and defs[node_id]["description"] == cls.DESCRIPTION
        assert all(entry["tooltip"] for entry in defs[node_id]["inputs"].values()), node_id


def test_every_node_has_search_aliases(pack_nodes):
    classes, _ = pack_nodes
    for node_id, cls in classes.items():
        aliases = getattr(cls, "SEARCH_ALIASES", None)
        assert isinstance(aliases, list) and aliases and all(isinstance(a, str) and a for a in aliases), node_id


def test_every_example_workflow_has_a_thumbnail():
    for workflow in sorted((PACK_ROOT / "example_workflows").glob("*.json")):
        thumb = workflow.with_suffix(".jpg")
        assert thumb.is_file(), f"{workflow.name} has no {thumb.name}"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 64


def test_registry_metadata():
    text = (PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    icon = re.search(r'^Icon\s*=\s*"([^"]+)"', text, re.M).group(1)
    local = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)$", icon)
    assert local, icon
    with Image.open(PACK_ROOT / local.group(1)) as im:
        assert im.size[0] == im.size[1] <= 400, im.size
    assert re.search(r'^Issues\s*=\s*"https://', text, re.M), "[project.urls] needs Issues (what the registry reads)"
    allowed = {"Operating System :: OS Independent", "Environment :: GPU :: NVIDIA CUDA", "Environment :: GPU :: AMD ROCm",
               "Environment :: GPU :: Intel Arc", "Environment :: NPU :: Huawei Ascend", "Environment :: GPU :: Apple Metal"}
    block = re.search(r"^classifiers = \[(.*?)\]", text, re.M | re.S).group(1)
    for classifier in re.findall(r'"([^"]+)"', block):
        if classifier.startswith(("Environment ::", "Operating System ::")):
            assert classifier in allowed, classifier
