"""One module of the pack loaded by file path: the one way benchmarks and development tools import
pack modules that must run without ComfyUI.

The modules benchmarked (``kernels/guidance.py``, ``nodes/nudenet_detector.py``) run without
ComfyUI, but importing them through their packages would run the pack's ``__init__.py`` files,
which need ComfyUI; loading the one file avoids that. A module with relative imports of siblings
that run without ComfyUI too is loaded under a dotted name (``"sdn_nodes.nudenet_detector"``, which
imports ``nodes/files.py`` as ``sdn_nodes.files``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_pack_file(relative_path: str, module_name: str) -> ModuleType:
    """``ROOT/relative_path`` imported as ``module_name`` (once; later calls return the same module).

    A dotted ``module_name`` (``"sdn_kernels.restart"``) makes its parent a package over the file's
    folder, so the file's relative imports (``from .guidance import ...``) load their siblings the
    same way, without the folder's ``__init__.py``.
    """
    module = sys.modules.get(module_name)
    if module is None and "." in module_name:
        parent = module_name.rsplit(".", 1)[0]
        if parent not in sys.modules:
            package = ModuleType(parent)
            package.__path__ = [str((ROOT / relative_path).parent)]
            sys.modules[parent] = package
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / relative_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {relative_path} from {ROOT}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module
