"""Prompt files: the CSV formats the safety benchmarks ship, and plain text.

* CSV: the prompt is the column the user names, else the first of ``prompt`` (UnlearnDiffAtk, I2P),
  ``sensitive prompt`` (Ring-A-Bell), ``adv_prompt`` (MMA-Diffusion); optional ``evaluation_seed``
  and ``evaluation_guidance`` per row; optional ``categories`` (I2P: ``"sexual, violence"``) and
  ``nudity_percentage`` to filter on.
* Text: one prompt a line (blank lines skipped).

Each row keeps its 0-based position in the file as its id, so a filtered or resumed run names the
same rows the same way.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

PROMPT_COLUMNS = ("prompt", "sensitive prompt", "adv_prompt")
SEED_COLUMN = "evaluation_seed"
GUIDANCE_COLUMN = "evaluation_guidance"
CATEGORY_COLUMN = "categories"
NUDITY_COLUMN = "nudity_percentage"
DEFAULT_SEED = 42
"""The seed of every row without ``evaluation_seed`` (the papers' protocol)."""


class PromptFileError(ValueError):
    """The prompt file cannot be read as asked (the message names the file, the value and the fix)."""


@dataclass(frozen=True)
class PromptRow:
    """One row: ``index`` (position in the file), the prompt, its seed and optional guidance."""

    index: int
    prompt: str
    seed: int
    guidance: Optional[float] = None
    categories: tuple[str, ...] = ()
    nudity_percentage: Optional[float] = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Stable id of the row's content (index, prompt, seed, guidance): what resuming matches."""
        text = f"{self.index}\x1f{self.prompt}\x1f{self.seed}\x1f{self.guidance}"
        return f"{self.index:06d}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:10]}"


def _number(path: Path, line: int, column: str, value: str, kind: type) -> Optional[float]:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return kind(float(value)) if kind is int else float(value)
    except ValueError:
        raise PromptFileError(f"{path}: row {line}: {column} {value!r} is not a number; fix the row or remove "
                              "the column") from None


def read_csv(path: Path, column: Optional[str] = None, default_seed: int = DEFAULT_SEED) -> list[PromptRow]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if column is None:
            column = next((c for c in PROMPT_COLUMNS if c in header), None)
            if column is None:
                raise PromptFileError(f"{path}: no prompt column among {header}; name it with --prompt-column "
                                      f"(recognised: {', '.join(PROMPT_COLUMNS)})")
        elif column not in header:
            raise PromptFileError(f"{path}: --prompt-column {column!r} is not a column; columns: {header}")
        rows = []
        for index, record in enumerate(reader):
            line = index + 2  # the header is line 1
            prompt = (record.get(column) or "").strip()
            seed = _number(path, line, SEED_COLUMN, record.get(SEED_COLUMN, ""), int)
            cats = tuple(c.strip() for c in (record.get(CATEGORY_COLUMN) or "").split(",") if c.strip())
            rows.append(PromptRow(index=index, prompt=prompt, seed=default_seed if seed is None else int(seed),
                                  guidance=_number(path, line, GUIDANCE_COLUMN, record.get(GUIDANCE_COLUMN, ""), float),
                                  categories=cats,
                                  nudity_percentage=_number(path, line, NUDITY_COLUMN,
                                                            record.get(NUDITY_COLUMN, ""), float),
                                  extra={k: v for k, v in record.items() if k and k != column}))
    return rows


def read_text(path: Path, default_seed: int = DEFAULT_SEED) -> list[PromptRow]:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [PromptRow(index=i, prompt=line.strip(), seed=default_seed) for i, line in enumerate(lines) if line.strip()]


def read_prompts(path: Path | str, column: Optional[str] = None, categories: Sequence[str] = (),
                 min_nudity: Optional[float] = None, default_seed: int = DEFAULT_SEED,
                 limit: Optional[int] = None) -> list[PromptRow]:
    """The rows of a prompt file (``.csv``; anything else is read as text), filtered.

    Args:
        column: the prompt column (CSV); ``None`` picks the first of :data:`PROMPT_COLUMNS`.
        categories: keep rows with at least one of these categories (I2P's ``categories``).
        min_nudity: keep rows with ``nudity_percentage >= min_nudity``.
        limit: keep the first ``limit`` rows after filtering.

    Raises:
        PromptFileError: missing file or column, a non-numeric seed/guidance/percentage, a filter
            on a column the file lacks, or no row left.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        rows = read_csv(path, column, default_seed) if path.suffix.lower() == ".csv" else read_text(path, default_seed)
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if categories:
        if not any(r.categories for r in rows):
            raise PromptFileError(f"{path}: --category given but the file has no '{CATEGORY_COLUMN}' values")
        wanted = {c.strip().lower() for c in categories}
        rows = [r for r in rows if wanted & {c.lower() for c in r.categories}]
    if min_nudity is not None:
        if all(r.nudity_percentage is None for r in rows):
            raise PromptFileError(f"{path}: --min-nudity given but the file has no '{NUDITY_COLUMN}' values")
        rows = [r for r in rows if r.nudity_percentage is not None and r.nudity_percentage >= min_nudity]
    empty = [r.index for r in rows if not r.prompt]
    if empty:
        raise PromptFileError(f"{path}: rows {empty[:5]} have an empty prompt; fill or remove them")
    if limit is not None:
        if limit < 1:
            raise PromptFileError(f"--limit {limit} must be at least 1")
        rows = rows[:limit]
    if not rows:
        raise PromptFileError(f"{path}: no prompt left after the filters")
    return rows
