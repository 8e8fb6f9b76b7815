"""Draw docs/nudity_reward_preview.png: the Nudity Reward Preview's table in a real ComfyUI frontend.

Starts a ComfyUI server on loopback with the pack (tests/harness: ``COMFYUI_PATH`` selects the
ComfyUI, else the vendored 2024-03 one), puts three skimage photos (astronaut, camera, coffee;
512x512) into its input directory, builds Load Image x3 -> Batch Images -> Nudity Reward Preview
in a headless Chromium (preset custom, threshold 0.5, classes ``*_EXPOSED, FACE_FEMALE`` so the
face is "unsafe" and gets pixelated), queues it from the page and saves a screenshot of the node.
Needs nudenet, onnxruntime, scikit-image and Debian's chromium.

Usage: COMFYUI_PATH=/path/to/ComfyUI python benchmarks/nudity_screenshot.py [out.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.browser import Chromium  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

sys.path.insert(0, str(ROOT))
from demo import console_logger  # noqa: E402

log = console_logger("benchmarks.nudity_screenshot")

PHOTOS = ("astronaut", "camera", "coffee")
BUILD_GRAPH = """
(async () => {
  app.graph.clear();
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); };
  const loads = %s.map((f, i) => {
    const n = add("LoadImage", [20, 20 + i * 80]); set(n, "image", f); n.collapse(); return n;
  });
  const b1 = add("ImageBatch", [260, 40]); loads[0].connect(0, b1, 0); loads[1].connect(0, b1, 1); b1.collapse();
  const b2 = add("ImageBatch", [260, 140]); b1.connect(0, b2, 0); loads[2].connect(0, b2, 1); b2.collapse();
  const r = add("SDN_NudityRewardPreview", [480, 20]);
  b2.connect(0, r, 0);
  set(r, "preset", "custom"); set(r, "threshold", 0.5); set(r, "unsafe_classes", "*_EXPOSED, FACE_FEMALE");
  set(r, "censor", "pixelate");
  r.size = [560, 420];
  await app.queuePrompt(0, 1);
  return r.id;
})()
"""


def main() -> None:
    import skimage.data

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "nudity_reward_preview.png"
    work = Path(tempfile.mkdtemp(prefix="sdn_screenshot_"))
    with ComfyServer(work / "server") as server:
        names = []
        for name in PHOTOS:
            array = getattr(skimage.data, name)()
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            Image.fromarray(array[..., :3]).resize((512, 512), Image.BICUBIC).save(server.input_dir / f"{name}.png")
            names.append(f"{name}.png")
        if server.version == "N":
            server.request("POST", "/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
        with Chromium(work / "browser", width=1100, height=880) as browser:
            browser.navigate(server.url)
            browser.wait_for("window.app && app.graph && typeof app.queuePrompt === 'function'", 60)
            browser.pump(1)
            node_id = browser.evaluate(BUILD_GRAPH % names)
            log.info(browser.wait_for("document.querySelector('.sdn-nudity')?.innerText", 120, what="the table"))
            browser.wait_for(f"(app.graph.getNodeById({node_id}).imgs || []).length >= 1", 30, what="previews")
            browser.evaluate(f"(() => {{ const r = app.graph.getNodeById({node_id}); app.canvas.ds.scale = 1; "
                             "app.canvas.ds.offset = [480 - r.pos[0], 30 - r.pos[1]]; "
                             "app.graph.setDirtyCanvas(true, true); return 1; })()")
            browser.pump(1.5)
            browser.screenshot(out)
    log.info(f"wrote {out}")


if __name__ == "__main__":
    main()
