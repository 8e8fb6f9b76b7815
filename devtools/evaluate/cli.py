"""``python -m devtools.evaluate``: a workflow over a prompt file on ComfyUI servers, every image
scored, the papers' table written. See ``--help`` and README, "Measure a model's safety"."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

from demo import console_logger
from devtools.comfy.locate import PACK_ROOT

from . import report
from devtools.comfy.server import ServerError

from .dispatch import IN_FLIGHT, Client, Job, LocalWorker, PromptFailed, RayWorker, start_local_server
from .prompts import DEFAULT_SEED, PromptFileError, read_prompts
from .scoring import Scoring
from .store import ResultStore, StoreError
from .workflow import Workflow, WorkflowError, parse_constant

log = logging.getLogger("devtools.evaluate")

EXAMPLES = """examples:
  # the digits model: prompts 7 and any, the plain and the Safe Denoiser outputs, digits classifier
  python -m devtools.evaluate --workflow example_workflows/digits_demo.json --prompts prompts.csv \\
      --prompt-input 2.digit --seed-input 6.seed --seed-input 7.seed --set 4.batch_size=1 \\
      --output Plain --output "Safe Denoiser" --scorer digits:7 --out eval_digits
  # a Stable Diffusion workflow over Ring-A-Bell on two running servers, NudeNet presets
  python -m devtools.evaluate --workflow my_sd15.json --prompts Ring-A-Bell.csv \\
      --prompt-input "CLIP Text Encode (Prompt).text" --seed-input KSampler.seed \\
      --servers http://10.0.0.5:8188,http://10.0.0.6:8188 --out eval_ringabell
"""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devtools.evaluate", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", required=True, help="UI-format (saved from the frontend) or API-format workflow JSON")
    p.add_argument("--prompts", required=True, help="prompt file: CSV (Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion, "
                                                    "I2P formats) or text, one prompt a line")
    p.add_argument("--prompt-column", help="CSV column of the prompt (default: prompt, sensitive prompt, adv_prompt)")
    p.add_argument("--prompt-input", action="append", default=[], required=True,
                   help="NODE.INPUT that receives the prompt (node id, title or unique class type); repeatable")
    p.add_argument("--seed-input", action="append", default=[], help="NODE.INPUT that receives the row's seed; repeatable")
    p.add_argument("--guidance-input", action="append", default=[],
                   help="NODE.INPUT that receives the row's evaluation_guidance (CFG) where the file has one")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="a constant for every row (JSON value or text), e.g. 4.batch_size=1; repeatable")
    p.add_argument("--output", action="append", default=[],
                   help="SaveImage / PreviewImage node (id or title) to score; repeatable; default: all of them")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of rows without evaluation_seed (default 42)")
    p.add_argument("--category", action="append", default=[], help="keep rows of this I2P category; repeatable")
    p.add_argument("--min-nudity", type=float, help="keep rows with nudity_percentage >= this (I2P)")
    p.add_argument("--limit", type=int, help="the first N rows after the filters")
    p.add_argument("--scorer", default="nudenet", help="nudenet (bundled 320n, every preset), "
                                                       "nudenet:/path/640m.onnx@640, or digits[:DIGIT] (default 7)")
    p.add_argument("--preset", action="append", default=[], metavar="NAME=THRESHOLD:CLASSES",
                   help="a further NudeNet preset scored beside the published ones, e.g. "
                        "'breasts=0.5:FEMALE_BREAST_EXPOSED' (classes as in the Nudity Reward Preview); repeatable")
    p.add_argument("--clip", default="", metavar="FOLDER",
                   help="a local Hugging Face CLIP folder (e.g. a snapshot of openai/clip-vit-large-patch14, the "
                        "papers' model): adds each image's CLIP score against its prompt and the mean per output")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--servers", help="comma-separated URLs of running ComfyUI servers with this pack installed")
    p.add_argument("--ray", action="store_true", help="run on a Ray cluster: one actor (and ComfyUI) per GPU, or "
                                                      "--workers actors on CPUs")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (default: one per GPU, else 1)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one row may take, its wait in the server's queue included (default 600)")
    p.add_argument("--retry-failed", action="store_true", help="run the rows recorded as failed again")
    p.add_argument("--quiet", action="store_true", help="errors only")
    return p.parse_args(argv)


class NoWorkerLeft(RuntimeError):
    """Every server or actor of the run was lost."""


class Run:
    """One invocation: workers, the workflow, the store, the loop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder (new, or one this command wrote before)")
        self.rows = read_prompts(args.prompts, args.prompt_column, args.category, args.min_nudity, args.seed, args.limit)
        self.workers: list[Any] = []
        self.scorer = Scoring(args.scorer, args.preset, args.clip)

    # -- workers ----------------------------------------------------------------------------------
    def start_workers(self) -> dict[str, Any]:
        """Start or reach the servers; return ``/object_info`` of the first."""
        a = self.args
        if a.ray:
            import ray

            ray.init(address=a.ray_address, runtime_env={"env_vars": {"PYTHONPATH": str(PACK_ROOT)}},
                     include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR if a.quiet else logging.INFO)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            count = a.workers or gpus or 1
            log.info("Ray: %d actor(s) on %s", count, "GPUs" if gpus else "CPUs")
            self.workers = RayWorker.start_all(count, self.out.resolve() / "servers", a.scorer, a.preset, a.clip, a.timeout,
                                                gpus > 0)
            return ray.get(self.workers[0].actor.object_info.remote())
        if a.servers:
            clients = [Client.reach(u.strip()) for u in a.servers.split(",") if u.strip()]
            self.workers = [LocalWorker(c, self.scorer, a.timeout) for c in clients]
            return clients[0].object_info()
        server = start_local_server(self.out / "server")
        self.workers = [LocalWorker(server, self.scorer, a.timeout, name="local")]
        return server.object_info()

    def close(self) -> None:
        for w in self.workers:
            w.close()
        if self.args.ray:
            import ray

            ray.shutdown()

    # -- rows -------------------------------------------------------------------------------------
    def prepare(self, object_info: dict[str, Any]) -> None:
        a = self.args
        self.workflow = wf = Workflow.load(a.workflow, object_info, a.output)
        self.targets = {"prompt": [wf.target(s, "--prompt-input") for s in a.prompt_input],
                        "seed": [wf.target(s, "--seed-input") for s in a.seed_input],
                        "guidance": [wf.target(s, "--guidance-input") for s in a.guidance_input]}
        self.constants = []
        for item in a.set:
            spec, sep, value = item.partition("=")
            if not sep:
                raise WorkflowError(f"--set {item!r} must be NODE.INPUT=VALUE")
            self.constants.append((wf.target(spec, "--set"), parse_constant(value)))
        if self.targets["guidance"] and all(r.guidance is None for r in self.rows):
            log.warning("--guidance-input is set but %s has no %s values: the workflow's own guidance is used",
                        a.prompts, "evaluation_guidance")
        # Rows are keyed by their content, so the prompt file may grow, shrink or be fixed between runs.
        identity = {"workflow": wf.fingerprint(), "scorer": a.scorer, "presets": a.preset, "outputs": wf.outputs,
                    "clip": str(Path(a.clip).resolve()) if a.clip else "",
                    "inputs": {k: [str(t) for t in v] for k, v in self.targets.items()},
                    "constants": [[str(t), v] for t, v in self.constants]}
        self.store = ResultStore(self.out, identity)

    def job(self, row: Any) -> Job:
        values: dict[str, Any] = {"prompt": (self.targets["prompt"], row.prompt), "seed": (self.targets["seed"], row.seed)}
        if row.guidance is not None and self.targets["guidance"]:
            values["guidance"] = (self.targets["guidance"], row.guidance)
        for i, (target, value) in enumerate(self.constants):
            values[f"const{i}"] = ([target], value)
        return Job(row.key, self.workflow.instance(values, f"sdn_eval/{row.key}"), dict(self.workflow.outputs), row.prompt)

    def record(self, row: Any, result: Optional[dict[str, Any]], error: Optional[str], worker: str) -> None:
        base = {"key": row.key, "index": row.index, "prompt": row.prompt, "seed": row.seed, "guidance": row.guidance,
                "categories": list(row.categories), "worker": worker}
        if result is None:
            self.store.append({**base, "status": "error", "error": error})
            return
        arms = {}
        for arm, images in result["images"].items():
            arms[arm] = [{"file": self.store.save_image(row.key, arm, i, data), **result["scores"][arm][i]}
                         for i, data in enumerate(images)]
        self.store.append({**base, "status": "ok", "arms": arms, "seconds": result["seconds"]})

    def loop(self) -> dict[str, Any]:
        from tqdm import tqdm

        done = {r["key"] for r in self.store.records() if r["status"] == "ok" or not self.args.retry_failed}
        todo = deque(r for r in self.rows if r.key not in done)
        done &= {r.key for r in self.rows}
        log.info("%d row(s), %d already done, %d to run on %d worker(s)", len(self.rows), len(self.rows) - len(todo),
                 len(todo), len(self.workers))
        started = time.monotonic()
        comfy_seconds = 0.0
        images = 0
        live = list(self.workers)
        used: set[str] = set()
        flight: dict[cf.Future, tuple[Any, Any]] = {}
        bar = tqdm(total=len(self.rows), initial=len(self.rows) - len(todo), unit="row", disable=self.args.quiet,
                   dynamic_ncols=True)
        try:
            while todo or flight:
                for w in live:
                    while todo and sum(1 for fw, _ in flight.values() if fw is w) < IN_FLIGHT:
                        row = todo.popleft()
                        flight[w.submit(self.job(row))] = (w, row)
                if not flight:
                    raise NoWorkerLeft(f"no server is left to run the remaining {len(todo)} row(s) (see the errors "
                                       "above); finished rows are kept: run the same command again to go on")
                finished, _ = cf.wait(list(flight), return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    w, row = flight.pop(fut)
                    try:
                        result = fut.result()
                    except PromptFailed as exc:
                        self.record(row, None, str(exc), w.name)
                        log.warning("row %d failed: %s", row.index, exc)
                    except Exception as exc:  # noqa: BLE001 (a dead server or actor: the worker leaves) - logged
                        log.error("worker %s lost (%s: %s); its rows are run again by the others, if any", w.name,
                                  type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                        if w in live:
                            live.remove(w)
                        todo.appendleft(row)
                        continue
                    else:
                        self.record(row, result, None, w.name)
                        used.add(w.name)
                        comfy_seconds += result["seconds"]["comfy"] or 0.0
                        images += sum(len(v) for v in result["images"].values())
                    bar.update(1)
        finally:
            bar.close()
        wall = time.monotonic() - started
        busy = comfy_seconds / (wall * max(1, len(used))) if wall > 0 and comfy_seconds else None
        return {"workers": len(used), "backend": "ray" if self.args.ray else ("servers" if self.args.servers else "local"),
                "rows_run": len(self.rows) - len(done), "wall_seconds": round(wall, 3),
                "images_per_second": round(images / wall, 3) if wall > 0 else None,
                "comfy_seconds": round(comfy_seconds, 3),
                "dispatch_overhead": None if busy is None else round(1.0 - busy, 4),
                "cpu_count": os.cpu_count()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    console_logger("devtools.evaluate", args.quiet)
    try:
        run = Run(args)
    except (PromptFileError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    timing: dict[str, Any] = {}
    code = 0
    try:
        run.prepare(run.start_workers())
        timing = run.loop()
    except (WorkflowError, StoreError, PromptFileError, ServerError) as exc:
        log.error("%s", exc)
        return 2
    except NoWorkerLeft as exc:
        log.error("%s", exc)
        code = 1
    except KeyboardInterrupt:
        log.error("interrupted: finished rows are kept; run the same command again to go on")
        code = 130
    finally:
        run.close()
    if hasattr(run, "store"):
        keys = {r.key for r in run.rows}
        records = [r for r in run.store.records() if r["key"] in keys]
        summary = report.write_all(run.out, records, list(run.scorer.presets), run.scorer.sources, timing,
                                   expected=len(run.rows))
        for arm, entry in summary["arms"].items():
            for preset in run.scorer.presets:
                s = entry[preset]
                log.info("%-28s %-22s ASR %s (%d/%d prompts)", arm, preset, report.percent(s["asr_prompts"]),
                         s["unsafe_prompts"], s["prompts"])
            if "clip_score" in entry:
                log.info("%-28s CLIP score %.2f (%d images)", arm, entry["clip_score"], entry["clip_images"])
        log.info("%d of %d row(s) done, %d failed; report: %s", summary["done"], summary["rows"], summary["failed"],
                 run.out / "report.html")
        if code == 0 and summary["failed"]:
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
