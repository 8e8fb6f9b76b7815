"""The pictures of the help pages (``web/docs/images/``), small copies of the pack's own results.

Help pages are served from ``/extensions/<pack>/docs/`` (the pack's ``WEB_DIRECTORY``), so their
pictures must live under ``web/``: ``docs/`` and ``example_workflows/`` are not served. Each picture
is made from a figure the pack's own runs produced:

* ``safe_denoiser_digits.jpg``: ``docs/demo_pairs.png`` (the digits demo, plain beside Safe Denoiser);
* ``restart_sampler_digits.jpg``: ``example_workflows/restart_sampler_digits.jpg`` (plain beside the
  Restart Sampler, the same seeds);
* ``nudity_reward_preview.jpg``: the node in ``docs/nudity_reward_preview.png`` (the web extension's
  screenshot from tests/test_nudity_reward_server.py);
* ``erase_concept_sdd_digits.jpg``: prompt ``7`` on the demo model beside the demo model with the
  shipped SDD edit, from a digits demo run (``python -m demo.run_demo --samples 40 --batch 40
  --out DIR``, its ``grid_prompt_7_none.png`` / ``grid_prompt_7_sdd.png`` / ``report.json``).

Usage: ``python -m devtools.help_images --demo-out DIR`` (rewrites the files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "web" / "docs" / "images"
QUALITY = 85
CELL, COLS, COUNT = 32, 10, 40  # the demo grids' tile size; the help figure's layout (as demo_pairs.png)
#: The Nudity Reward Preview node in docs/nudity_reward_preview.png (left, top, right, bottom).
NUDITY_NODE_BOX = (520, 40, 1082, 798)

log = logging.getLogger("devtools.help_images")


def _save_jpeg(image: Image.Image, name: str, max_width: int = 688) -> Path:
    image = image.convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    path = IMAGES_DIR / name
    tmp = path.with_name(f".{name}.tmp")
    image.save(tmp, "JPEG", quality=QUALITY, optimize=True)
    os.replace(tmp, path)
    log.info("wrote %s (%dx%d, %d bytes)", path.relative_to(ROOT), image.width, image.height, path.stat().st_size)
    return path


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tiles(grid_png: Path, count: int = COUNT) -> list[Image.Image]:
    """The first ``count`` tiles of a demo grid (``demo/run_demo.py``'s ``grid``: 32 px cells, 25 columns)."""
    with Image.open(grid_png) as grid:
        grid = grid.convert("RGB")
        cols = grid.width // CELL
        return [grid.crop(((i % cols) * CELL, (i // cols) * CELL, (i % cols + 1) * CELL, (i // cols + 1) * CELL))
                for i in range(count)]


def sdd_figure(demo_out: Path) -> Image.Image:
    """Prompt ``7``: the demo model (left) beside it with the shipped SDD edit (right), the same seeds."""
    report = json.loads((demo_out / "report.json").read_text(encoding="utf-8"))
    arms = {(a["prompt"], a["guidance"]): a for a in report["arms"]}
    negated = report["negated_class"]
    label, gap = 20, 16
    rows = -(-COUNT // COLS)
    panel_w, panel_h = COLS * CELL, rows * CELL
    canvas = Image.new("RGB", (2 * panel_w + 3 * gap, panel_h + label + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    for j, guidance in enumerate(("none", "sdd")):
        arm = arms[(str(negated), guidance)]
        x = gap + j * (panel_w + gap)
        name = "plain" if guidance == "none" else "SDD-erased model"
        draw.text((x, gap), f"{name}, prompt {negated}: {negated} = {arm['negated_rate']:.1%} of {arm['n']}",
                  fill=(0, 0, 0), font=_font())
        for i, tile in enumerate(_tiles(demo_out / f"grid_prompt_{negated}_{guidance}.png")):
            canvas.paste(tile, (x + (i % COLS) * CELL, gap + label + (i // COLS) * CELL))
    return canvas


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Write the help pages' pictures into web/docs/images.")
    p.add_argument("--demo-out", type=Path, required=True, help="a run_demo output folder (--samples 40 or more)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Image.open(ROOT / "docs" / "demo_pairs.png") as im:
        _save_jpeg(im, "safe_denoiser_digits.jpg")
    with Image.open(ROOT / "example_workflows" / "restart_sampler_digits.jpg") as im:
        _save_jpeg(im, "restart_sampler_digits.jpg")
    with Image.open(ROOT / "docs" / "nudity_reward_preview.png") as im:
        _save_jpeg(im.crop(NUDITY_NODE_BOX), "nudity_reward_preview.jpg", max_width=480)
    _save_jpeg(sdd_figure(args.demo_out), "erase_concept_sdd_digits.jpg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
