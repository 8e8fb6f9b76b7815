"""The node help panel of the current ComfyUI frontend, in a real headless Chromium on a real server.

How the frontend (comfyui-frontend-package: 1.27.10, the one ComfyUI v0.3.64 pins, and later ones)
shows a custom node's help: the node library (side bar) lists every node; the "Learn more" (?)
button of an entry, shown while the pointer is on it, opens the help page. That page fetches
``/extensions/<pack>/docs/<NodeID>/<locale>.md`` and, when that is missing,
``/extensions/<pack>/docs/<NodeID>.md`` (``<pack>`` from the node's ``python_module``,
``custom_nodes.<pack>``), renders the Markdown (marked + DOMPurify) and resolves relative images
against ``/extensions/<pack>/docs/``. Without a page it shows the description and the tooltips
instead, so the test checks text only the page has. The 2024-03 ComfyUI's frontend has no help
panel: skipped there.

Another frontend than the installed one, e.g. the one v0.3.64 pins:
``pip install --no-deps --target /tmp/fe comfyui-frontend-package==1.27.10``, then run with
``PYTHONPATH=/tmp/fe COMFYUI_PATH=...`` (the server serves the package Python finds first).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from harness.browser import Chromium, web_ui_skip_reason
from harness.locate import REPO_ROOT, TESTS_DIR, TEST_NODES_NAME, pack_file
from harness.server import frontend_root

node_docs = pack_file("devtools/node_docs.py", "sdn_node_docs")

NODE = "SDN_SafeDenoiserRestartSampler"
DISPLAY_NAME = "Safe Denoiser Restart Sampler"
UNIQUE = "A restart needs no such estimate, only the test."
"""A sentence of the node's help page (web/docs) found nowhere else: not in its description or tooltips."""
SCREENSHOT_DIR = TESTS_DIR / "_out"
HELP_MARKERS = (b"/docs/${", b"nodeHelp")
"""Strings of the frontend bundle's help-page code (its fetch URL template, the help store's id)."""


def frontend_has_help_panel() -> bool:
    """Whether the installed frontend's bundle carries the node help page (frontend >= 1.2x)."""
    root = frontend_root()
    if root is None:
        return False
    for script in (root / "assets").glob("*.js"):
        data = script.read_bytes()
        if all(marker in data for marker in HELP_MARKERS):
            return True
    return False


@pytest.fixture(scope="module")
def server(comfy_server):
    reason = web_ui_skip_reason(comfy_server)
    if reason:
        pytest.skip(reason)
    if comfy_server.version == "O":
        pytest.skip("the 2024-03 ComfyUI's frontend has no node help panel (the frontend gained it in 2025)")
    if not frontend_has_help_panel():
        pytest.skip(f"the installed ComfyUI frontend ({frontend_root()}) has no node help panel")
    # No first-run gallery over the canvas; the node library that has the help button; English pages.
    status, body = comfy_server.request("POST", "/settings", {"Comfy.TutorialCompleted": True,
                                                              "Comfy.NodeLibrary.NewDesign": False,
                                                              "Comfy.Locale": "en"})
    assert status == 200, body
    return comfy_server


def js(value: str) -> str:
    return json.dumps(value)


def test_help_panel_renders_the_node_page(server, tmp_path):
    page = (REPO_ROOT / "web" / "docs" / f"{NODE}.md").read_text(encoding="utf-8")
    assert UNIQUE in " ".join(page.split()), f"update UNIQUE: it is no longer in web/docs/{NODE}.md"
    images = node_docs.help_page_images(page)
    assert images, f"web/docs/{NODE}.md has no picture"
    pack = next(name for name in server.packs if name != TEST_NODES_NAME)
    base = f"/extensions/{pack}/docs/"

    with Chromium(tmp_path / "browser") as browser:
        browser.navigate(server.url)
        browser.wait_for("!!(window.app && app.graph && app.extensionManager)", 60, what="the ComfyUI app")

        # The node library (side bar), searched for the node, and its "Learn more" (?) button. Selectors
        # of frontend 1.58 (data-testid, aria-label) and of 1.27 (the classes v0.3.64 pins) alike.
        browser.click("document.querySelector('[data-testid=\"node-library-tab-button\"], .node-library-tab-button')",
                      "the node library button")
        search = ("document.querySelector('[data-testid=\"node-library-search\"] input, "
                  "input[data-testid=\"node-library-search\"], .node-lib-search-box input')")
        browser.wait_for(f"!!({search})", 20, what="the node library's search box")
        browser.type_text(search, DISPLAY_NAME)
        entry = ("Array.from(document.querySelectorAll('.node-lib-tree-explorer [data-testid^=\"tree-node-\"], "
                 ".node-lib-tree-explorer .tree-leaf'))"
                 f".find(el => (el.querySelector('.node-label') || el).textContent.trim() === {js(DISPLAY_NAME)})")
        browser.wait_for(f"!!({entry})", 20, what=f"{DISPLAY_NAME} in the node library")
        browser.hover(entry, f"the {DISPLAY_NAME} entry")  # pointing at it reveals its buttons
        browser.record_network()  # what opening the help fetches
        browser.click(f"({entry}).querySelector('button[aria-label=\"Learn more\"], button.help-button')",
                      "the Learn more button")

        # The help page, rendered by the frontend from the pack's Markdown.
        content = "document.querySelector('.node-help-content')"
        text = browser.wait_for(f"(() => {{ const t = (({content})?.textContent || '').replace(/\\s+/g, ' '); "
                                f"return t.includes({js(UNIQUE)}) && t; }})()",
                                30, what="the node's help page in the help panel")
        heading = browser.evaluate(f"({content}).querySelector('h1')?.textContent")
        assert heading == DISPLAY_NAME
        for name in ("max_restarts", "recall", "false_alarm"):  # the generated input table, rendered
            assert name in browser.evaluate(f"Array.from(({content}).querySelectorAll('table td code'), c => c.textContent)"
                                            ".join(' ')"), name
        assert "Inputs" in text and "Outputs" in text

        # Its pictures, resolved against /extensions/<pack>/docs/ and loaded from the server.
        shown = browser.wait_for(
            f"(() => {{ const imgs = Array.from(({content}).querySelectorAll('img')); "
            "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) && "
            "imgs.map(i => ({src: new URL(i.src).pathname, width: i.naturalWidth})); })()",
            30, what="the help page's pictures to load")
        assert [img["src"] for img in shown] == [base + src for src in images], shown

        # What the frontend fetched: the locale's page first (none shipped: 404), then <NodeID>.md.
        fetched = [(urllib.parse.urlsplit(url).path, status) for url, status in browser.responses
                   if urllib.parse.urlsplit(url).path.startswith(base)]
        assert fetched[:2] == [(base + f"{NODE}/en.md", 404), (base + f"{NODE}.md", 200)], fetched
        assert {(base + src, 200) for src in images} <= set(fetched), fetched

        browser.evaluate(f"({content}).querySelector('img').scrollIntoView({{block: 'center'}})")
        browser.pump(0.3)
        shot = browser.screenshot(tmp_path / f"help_panel_{server.version}.png")
        assert shot.stat().st_size > 10_000
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT_DIR / shot.name)
        (SCREENSHOT_DIR / f"help_panel_{server.version}_fetched.json").write_text(
            json.dumps({"fetched": fetched, "images": shown}, indent=1) + "\n", encoding="utf-8")
        assert not [e for e in browser.errors if "help" in e.lower()], browser.errors
