"""ruff's pyflakes and syntax rules (F, E9) over every Python file of the repository: the code has
no unused imports, undefined names or syntax errors, and stays that way (issue: lint in CI)."""

from __future__ import annotations

import subprocess
import sys

from harness.locate import REPO_ROOT

PATHS = ["__init__.py", "nodes", "kernels", "devtools", "demo", "benchmarks", "tests"]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9",
                             "--exclude", "tests/.runtime", "--output-format", "concise", *PATHS],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
