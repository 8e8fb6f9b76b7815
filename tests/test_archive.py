"""The archive published to the Comfy Registry: built the way `comfy node pack` builds it
(comfy-cli's own ``zip_files``: git-tracked files minus ``.comfyignore``), it holds what users run
and nothing else, passes the scans the registry runs on published versions (subprocess, network,
environment variables, eval/exec, shell deletions), and loads in a real ComfyUI with every node."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.locate import REPO_ROOT
from harness.server import ComfyServer
from test_server import DISPLAY_NAMES

SHIPPED = ["__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE", "nodes/safe_denoiser.py",
           "nodes/reference_sampler.py", "kernels/guidance.py", "web/nudity_reward_preview.js",
           "web/docs/SDN_SafeDenoiserPatch.md", "locales/en/nodeDefs.json", "demo/__init__.py", "demo/digits.py",
           "demo/digits_ldm.safetensors", "demo/concept_erased/digits_sdd7.safetensors", "example_workflows/digits_demo.json", "example_workflows/digits_demo.jpg",
           "docs/icon.png", "web/docs/images/restart_sampler_digits.jpg"]
NOT_SHIPPED = ("tests/", "benchmarks/", "devtools/", ".ci/", "demo/run.sh", "demo/run_demo.py", "demo/train_digits.py")
RUFF_RULES = "S102,S307,S310,S602,S603,S604,S605,S606,S607,S609,S113"
"""exec, eval, urlopen, the subprocess/shell family, wildcard injection, requests without timeout."""
PATTERNS = {
    "subprocess": r"\bsubprocess\b|\bos\.(system|popen|exec\w*|spawn\w*)\(",
    "network": r"\b(urllib|requests|socket|http\.client|aiohttp)\b",
    "environment": r"\bos\.environ\b|\bgetenv\(",
    "eval/exec": r"(?<![.\w])(eval|exec)\(",
    "deletion": r"\brmtree\(|\brm\s+-rf?\b",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("the archive is built from git-tracked files: needs git and a clone")
    from comfy_cli.file_utils import zip_files

    out = tmp_path_factory.mktemp("archive") / "node.zip"
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        zip_files(str(out))
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def unpacked(archive, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("unpacked") / "safe-denoiser"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    return dest


def test_archive_holds_the_pack_and_no_development_files(archive):
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    missing = [name for name in SHIPPED if name not in names]
    assert not missing, f"not in the archive: {missing}"
    leaked = sorted(name for name in names if name.startswith(NOT_SHIPPED))
    assert not leaked, f"development files in the archive: {leaked[:10]}"


def test_archive_passes_the_registry_scans(unpacked):
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", RUFF_RULES,
                             "--output-format", "concise", str(unpacked)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    found = []
    for path in sorted(unpacked.rglob("*")):
        if path.suffix not in (".py", ".js", ".sh"):
            continue
        text = path.read_text(encoding="utf-8")
        for what, pattern in PATTERNS.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(unpacked)}:{line}: {what}: {match.group(0)}")
    assert not found, "\n".join(found)


def test_pack_from_the_archive_loads_in_a_real_comfyui(unpacked, tmp_path):
    with ComfyServer(tmp_path / "server", pack_root=unpacked) as server:
        info = server.object_info()
        missing = [node_id for node_id in DISPLAY_NAMES if node_id not in info]
        assert not missing, f"not registered from the archive: {missing}\n{server.log_tail(40)}"
        for node_id, name in DISPLAY_NAMES.items():
            assert info[node_id]["display_name"] == name
