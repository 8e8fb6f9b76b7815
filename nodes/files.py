"""What the node modules share about files and memos, without ComfyUI: a file's change stamp, path
confinement inside a root, and a thread-safe least-recently-used memo.

It imports nothing from the pack, so modules loaded without their package (``nodes/nudenet_detector.py``
in the benchmarks and the evaluation tool, through ``devtools.pack_file.load_pack_file`` with a dotted
module name) can import it too. ``demo/digits.py`` (numpy only, no ``nodes`` import) keeps its own memo.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Optional

FileStamp = tuple[str, int, int]
_MISSING = object()


def file_stamp(path: str) -> FileStamp:
    """``(path, size in bytes, mtime in ns)``: a cheap marker that changes when the file is rewritten.
    Raises OSError when ``path`` does not exist."""
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


class OutsideRoot(ValueError):
    """A path that resolves (symlinks followed) outside the folder it must stay in."""

    def __init__(self, root: str, path: str):
        super().__init__(f"{path} is outside {root}")
        self.root = root
        self.path = path


def within(real_root: str, path: str) -> bool:
    """Whether ``path``, symlinks followed, lies inside ``real_root`` (an already resolved folder)."""
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def confined(root: str, rel: str) -> str:
    """``root/rel`` resolved (symlinks followed; it need not exist). Raises :class:`OutsideRoot` (with the
    resolved root) when that leaves ``root`` (a ``..`` or a symlink pointing elsewhere)."""
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, rel))
    if not within(real_root, candidate):
        raise OutsideRoot(real_root, candidate)
    return candidate


class LockedLRU:
    """A memo shared between threads (ComfyUI runs prompts on a worker thread, ``IS_CHANGED`` and
    validation on the server's): every access under one lock, least recently used entries dropped
    first beyond ``max_entries`` (None: unbounded). Values are built outside the lock, so two threads
    may build the same value; the last one stored is kept. ``hits`` / ``misses`` count :meth:`get`.
    """

    def __init__(self, max_entries: Optional[int] = None):
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
            return default

    def put(self, key: Hashable, value: Any, over_budget: Optional[Callable[[Iterable[Any]], bool]] = None) -> None:
        """Store ``value``, then drop the least recently used entries while there are more than
        ``max_entries`` or ``over_budget(values)`` holds."""
        with self._lock:
            self._entries[key] = value
            while self._entries and ((self.max_entries is not None and len(self._entries) > self.max_entries)
                                     or (over_budget is not None and over_budget(self._entries.values()))):
                self._entries.popitem(last=False)

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value of ``key``, built with ``build()`` and stored on a miss."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = build()
            self.put(key, value)
        return value

    def discard(self, which: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key ``which`` accepts."""
        with self._lock:
            for key in [k for k in self._entries if which(k)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
