"""Benchmark: the evaluation tool's throughput on a local Ray cluster, 1 worker against N, one run.

    COMFYUI_PATH=<ComfyUI checkout> python benchmarks/bench_evaluate.py [--rows 24] [--workers 2]

Runs ``python -m devtools.evaluate`` on the digits demo workflow (the digits classifier as the
scorer) over the same prompt file with ``--ray --workers 1`` and ``--workers N``, each into a
fresh folder, and prints images per second, the ratio, and the dispatch overhead (the share of
the servers' time not spent executing prompts, from current ComfyUI's execution timestamps; the
2024-03 ComfyUI records none). Server start-up is outside the timed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.pack_file import load_pack_file  # noqa: E402

log = load_pack_file("demo/__init__.py", "sdn_demo").console_logger("benchmarks.bench_evaluate")


def run(rows_csv: Path, out: Path, workers: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "devtools.evaluate", "--workflow", str(ROOT / "example_workflows" / "digits_demo.json"),
           "--prompts", str(rows_csv), "--prompt-input", "2.digit", "--seed-input", "6.seed", "--seed-input", "7.seed",
           "--set", f"4.batch_size={batch}", "--scorer", "digits:7", "--ray", "--workers", str(workers),
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads((out / "report.json").read_text(encoding="utf-8"))["timing"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--batch", type=int, default=8, help="images per row (each output)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        rows = Path(tmp) / "rows.csv"
        rows.write_text("prompt,evaluation_seed\n" + "".join(f"{'7' if i % 2 else 'any'},{i}\n" for i in range(args.rows)))
        one = run(rows, Path(tmp) / "one", 1, args.batch)
        many = run(rows, Path(tmp) / "many", args.workers, args.batch)
    log.info(f"{args.rows} rows x {args.batch} images x 2 outputs, digits model, {os.cpu_count()} CPU cores")
    for name, t in (("1 worker", one), (f"{args.workers} workers", many)):
        overhead = "n/a (no execution timestamps)" if t["dispatch_overhead"] is None else f"{t['dispatch_overhead']:.1%}"
        log.info(f"{name:>10}: {t['images_per_second']:6.2f} images/s, {t['wall_seconds']:6.1f} s, "
                 f"dispatch overhead {overhead}")
    log.info(f"throughput {args.workers} workers / 1 worker: {many['images_per_second'] / one['images_per_second']:.2f}x")


if __name__ == "__main__":
    main()
