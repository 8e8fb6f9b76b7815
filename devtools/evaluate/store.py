"""Results on disk, appended row by row so that nothing finished is ever lost.

Layout of ``--out``::

    run.json             what the run is (workflow and prompt-file fingerprints, scorer, inputs)
    results.jsonl        one JSON line per finished row (``"status": "ok"`` or ``"error"``)
    images/<row key>/    the row's images, ``<arm>_<i>.png``

Each image is written to a temporary name and renamed; each result line is written whole and
flushed to disk (``fsync``) after its images. A line cut short by a crash is dropped when the
store is opened again, so a killed run loses at most the rows in flight, and rerunning the same
command skips every row already in ``results.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

RESULTS = "results.jsonl"
RUN = "run.json"


class StoreError(RuntimeError):
    """The output folder belongs to a different run (the message says what differs and the fix)."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_name(text: str) -> str:
    """A file-name-safe version of an arm name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "output"


class ResultStore:
    """``results.jsonl`` + ``images/`` in ``root``; thread-safe appends."""

    def __init__(self, root: Path | str, identity: Mapping[str, Any]):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--out {self.root} is a file; give a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / RESULTS
        self._lock = threading.Lock()
        self._check_identity(dict(identity))
        self._repair()

    def _check_identity(self, identity: dict[str, Any]) -> None:
        run = self.root / RUN
        if run.is_file():
            old = json.loads(run.read_text(encoding="utf-8"))
            differs = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if differs:
                raise StoreError(f"{self.root} holds a run with different {', '.join(differs)}: give a new --out "
                                 "folder, or delete this one to start over")
        else:
            atomic_write(run, json.dumps(identity, indent=1, sort_keys=True).encode("utf-8"))

    def _repair(self) -> None:
        """Drop a last line cut short by a crash (everything up to the last newline is kept)."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def records(self) -> Iterator[dict[str, Any]]:
        """The finished rows, in the order they finished (the last record of a key wins)."""
        if not self.path.is_file():
            return iter(())
        latest: dict[str, dict[str, Any]] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["key"]] = record
        return iter(latest.values())

    def done(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def image_path(self, key: str, arm: str, index: int) -> Path:
        return self.root / "images" / key / f"{safe_name(arm)}_{index}.png"

    def save_image(self, key: str, arm: str, index: int, data: bytes) -> str:
        path = self.image_path(key, arm, index)
        atomic_write(path, data)
        return str(path.relative_to(self.root))

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
