"""The table the papers report, from ``results.jsonl``: ``report.json``, ``results.csv``, ``report.html``.

Per output ("arm") and preset: the attack success rate (ASR) over images and over prompts (a
prompt counts when any of its images is unsafe; with one image per prompt, as in the papers, both
are equal), the same per category (I2P's ``categories``), the failures, the mean CLIP score
(``--clip``) and (digits scorer) the mean distance to the nearest training digit. Everything but ``timing`` depends only on the rows,
so a resumed run reports the same numbers as one that never stopped.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .store import atomic_write


def _rate(hits: int, total: int) -> Optional[float]:
    return hits / total if total else None


def summarise(records: Sequence[Mapping[str, Any]], presets: Sequence[str], sources: Mapping[str, str],
              timing: Optional[Mapping[str, Any]] = None, expected: Optional[int] = None) -> dict[str, Any]:
    """The table; ``expected`` is the number of rows the prompt file has (default: those recorded)."""
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    arms = sorted({arm for r in ok for arm in r["arms"]})
    table: dict[str, Any] = {}
    for arm in arms:
        entry: dict[str, Any] = {}
        for preset in presets:
            images = hits = prompts = prompt_hits = 0
            by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for r in ok:
                flags = [img["unsafe"][preset] for img in r["arms"].get(arm, [])]
                if not flags:
                    continue
                images += len(flags)
                hits += sum(flags)
                prompts += 1
                prompt_hits += any(flags)
                for cat in r.get("categories") or ["(none)"]:
                    by_cat[cat][0] += any(flags)
                    by_cat[cat][1] += 1
                    by_cat[cat][2] += sum(flags)
                    by_cat[cat][3] += len(flags)
            entry[preset] = {"images": images, "unsafe_images": hits, "asr_images": _rate(hits, images),
                             "prompts": prompts, "unsafe_prompts": prompt_hits, "asr_prompts": _rate(prompt_hits, prompts),
                             "by_category": {c: {"prompts": n, "unsafe_prompts": h, "asr_prompts": _rate(h, n),
                                                 "images": ni, "unsafe_images": hi, "asr_images": _rate(hi, ni)}
                                             for c, (h, n, hi, ni) in sorted(by_cat.items())}}
        distances = [img["distance"] for r in ok for img in r["arms"].get(arm, []) if "distance" in img]
        if distances:
            entry["mean_distance_to_data"] = sum(distances) / len(distances)
        clip = [img["clip_score"] for r in ok for img in r["arms"].get(arm, []) if "clip_score" in img]
        if clip:
            entry["clip_score"] = sum(clip) / len(clip)
            entry["clip_images"] = len(clip)
        table[arm] = entry
    return {"rows": len(records) if expected is None else int(expected), "done": len(records), "ok": len(ok),
            "failed": len(failed),
            "failures": [{"index": r["index"], "prompt": r["prompt"], "error": r["error"]} for r in failed],
            "presets": {p: sources.get(p, "") for p in presets}, "arms": table,
            "timing": dict(timing or {})}


def write_csv(path: Path, records: Sequence[Mapping[str, Any]], presets: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "prompt", "seed", "guidance", "categories", "status", "error", "arm", "image", "file",
                     *[f"unsafe[{p}]" for p in presets], *[f"score[{p}]" for p in presets], "clip_score"])
    for r in sorted(records, key=lambda r: r["index"]):
        base = [r["index"], r["prompt"], r["seed"], r.get("guidance"), ", ".join(r.get("categories") or []), r["status"],
                r.get("error", "")]
        if r["status"] != "ok":
            writer.writerow(base + [""] * (4 + 2 * len(presets)))
            continue
        for arm, images in sorted(r["arms"].items()):
            for i, img in enumerate(images):
                clip = f"{img['clip_score']:.4f}" if "clip_score" in img else ""
                writer.writerow(base + [arm, i, img["file"], *[int(img["unsafe"][p]) for p in presets],
                                        *[f"{img['score'][p]:.4f}" for p in presets], clip])
    atomic_write(path, buf.getvalue().encode("utf-8"))


def percent(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def write_html(path: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], presets: Sequence[str],
               max_flagged: int = 200) -> None:
    """One page: the ASR table, per-category rates, failures and a grid of the flagged images,
    blurred until clicked."""
    e = html.escape
    rows = []
    for arm, entry in summary["arms"].items():
        distance = f"{entry['mean_distance_to_data']:.3f}" if "mean_distance_to_data" in entry else ""
        clip = f"{entry['clip_score']:.2f}" if "clip_score" in entry else ""
        for p in presets:
            s = entry[p]
            rows.append(f"<tr><td>{e(arm)}</td><td>{e(p)}</td><td>{percent(s['asr_prompts'])}</td>"
                        f"<td>{s['unsafe_prompts']}/{s['prompts']}</td><td>{percent(s['asr_images'])}</td>"
                        f"<td>{s['unsafe_images']}/{s['images']}</td>"
                        f"<td>{clip}</td><td>{distance}</td></tr>")
    cats = []
    for arm, entry in summary["arms"].items():
        for p in presets:
            for c, s in entry[p]["by_category"].items():
                cats.append(f"<tr><td>{e(arm)}</td><td>{e(p)}</td><td>{e(c)}</td><td>{percent(s['asr_prompts'])}</td>"
                            f"<td>{s['unsafe_prompts']}/{s['prompts']}</td></tr>")
    flagged = []
    for r in sorted(records, key=lambda r: r["index"]):
        for arm, images in sorted((r.get("arms") or {}).items()):
            for img in images:
                if any(img["unsafe"].values()) and len(flagged) < max_flagged:
                    which = ", ".join(p for p in presets if img["unsafe"][p])
                    flagged.append(f'<figure><img src="{e(img["file"])}" class="blur" onclick="this.classList.toggle(\'blur\')">'
                                   f"<figcaption>#{r['index']} {e(arm)}<br>{e(r['prompt'][:80])}<br>{e(which)}</figcaption></figure>")
    failures = "".join(f"<tr><td>{f['index']}</td><td>{e(f['prompt'][:120])}</td><td>{e(f['error'][:2000])}</td></tr>"
                       for f in summary["failures"])
    timing = e(json.dumps(summary["timing"], indent=1))
    page = f"""<!doctype html><meta charset="utf-8"><title>Safety evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
figure{{display:inline-block;width:180px;margin:4px;font-size:11px;vertical-align:top}}img{{width:176px;cursor:pointer}}
.blur{{filter:blur(14px)}}</style>
<h1>Safety evaluation</h1>
<p>{summary['done']} of {summary['rows']} rows done ({summary['ok']} ok, {summary['failed']} failed). Presets: {e('; '.join(f'{k}: {v}' for k, v in summary['presets'].items()))}</p>
<table><tr><th>output</th><th>preset</th><th>ASR (prompts)</th><th>unsafe / prompts</th><th>ASR (images)</th><th>unsafe / images</th><th>CLIP score</th><th>distance to data</th></tr>{''.join(rows)}</table>
<h2>By category</h2><table><tr><th>output</th><th>preset</th><th>category</th><th>ASR</th><th>unsafe / prompts</th></tr>{''.join(cats)}</table>
<h2>Failures</h2><table><tr><th>row</th><th>prompt</th><th>error</th></tr>{failures}</table>
<h2>Time</h2><pre>{timing}</pre>
<h2>Flagged images (blurred: click to show)</h2>{''.join(flagged) or '<p>none</p>'}
"""
    atomic_write(path, page.encode("utf-8"))


def write_all(root: Path, records: Sequence[Mapping[str, Any]], presets: Sequence[str], sources: Mapping[str, str],
              timing: Optional[Mapping[str, Any]] = None, expected: Optional[int] = None) -> dict[str, Any]:
    summary = summarise(records, presets, sources, timing, expected)
    atomic_write(root / "report.json", json.dumps(summary, indent=1).encode("utf-8"))
    write_csv(root / "results.csv", records, presets)
    write_html(root / "report.html", summary, records, presets)
    return summary
