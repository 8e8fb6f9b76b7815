"""NudeNet v3 detection for ComfyUI IMAGE batches: optional backend, models, sessions, providers.

NudeNet (PyPI ``nudenet``, MIT) and ``onnxruntime`` are optional: nothing here imports them
until a detection is asked for, so the pack loads without them; :func:`load_detector` then raises
:class:`BackendMissing` with the install command.

* Models: the ``320n`` model bundled in the nudenet wheel, or any ``.onnx`` file in
  ``models/nudenet/`` (a registered model folder, so ``extra_model_paths.yaml`` entries named
  ``nudenet`` work too), e.g. NudeNet's ``640m.onnx`` with ``inference_resolution=640``.
* Sessions: one ``onnxruntime.InferenceSession`` per (model file, execution providers), reused
  across images and prompts. NudeNet 3.4.2 ignores its own ``providers`` argument, so the session
  is built here with the chosen providers and handed to a ``NudeDetector``: the GPU provider
  (CUDA, ROCm, DirectML, CoreML) is used when onnxruntime offers one and ComfyUI runs on a GPU,
  the CPU otherwise.
* Images: a ComfyUI IMAGE (float RGB ``[B, H, W, 3]`` in 0..1) becomes uint8 BGR exactly as
  ComfyUI's Save Image writes it (``clip(255 * x).astype(uint8)``) and as ``cv2.imread`` reads it
  back, so the scores equal NudeNet's on the saved PNG files, which is what papers measured.

ComfyUI's modules are imported inside the functions that need them (model folders, the torch
device), so the detection part runs without ComfyUI too (``benchmarks/bench_nudenet.py``, the
evaluation tool: they load this file with ``nodes/files.py``, its one sibling import, through
``devtools.pack_file.load_pack_file("nodes/nudenet_detector.py", "sdn_nodes.nudenet_detector")``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .files import LockedLRU, file_stamp

log = logging.getLogger(__name__)

FOLDER_NAME = "nudenet"
MODEL_EXTENSIONS = {".onnx"}
BUNDLED_MODEL = "320n (bundled)"
BUNDLED_FILE = "320n.onnx"
DEFAULT_RESOLUTION = 320
INSTALL_HINT = ("pip install nudenet onnxruntime (or onnxruntime-gpu instead of onnxruntime for an NVIDIA GPU), "
                "into the Python environment that runs ComfyUI, then restart ComfyUI")
DEVICES = ("auto", "cpu")
DETECT_BATCH = 8
"""Images per onnxruntime call."""
MAX_SESSIONS = 4
CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
"""onnxruntime's GPU providers in order of preference (TensorRT is left out: it compiles an engine
for minutes on first use)."""
_DEVICE_ID_PROVIDERS = {"CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider"}


class BackendMissing(ImportError):
    """nudenet or onnxruntime is not installed (the message says what to install)."""


def register_folder() -> None:
    """Register ``models/nudenet`` for ``.onnx`` files (keeping dirs from extra_model_paths.yaml)."""
    from .paths import register_model_folder  # imports ComfyUI: only when running inside it

    register_model_folder(FOLDER_NAME, MODEL_EXTENSIONS)


def model_names() -> list[str]:
    """The bundled model first, then the ``.onnx`` files of ``models/nudenet``."""
    import folder_paths

    try:
        files = folder_paths.get_filename_list(FOLDER_NAME)
    except KeyError:  # the folder was never registered (should not happen once the pack loaded)
        log.warning("model folder %r is not registered", FOLDER_NAME)
        files = []
    return [BUNDLED_MODEL] + sorted(f for f in files if f.lower().endswith(".onnx"))


def backend_status() -> Optional[str]:
    """``None`` when nudenet and onnxruntime are importable, else what is missing (no import)."""
    missing = [name for name in ("nudenet", "onnxruntime", "cv2") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"missing Python package(s) {', '.join(missing)}: {INSTALL_HINT}"


def _import_backend() -> tuple[Any, Any]:
    """``(onnxruntime, nudenet.nudenet)``, or :class:`BackendMissing` with the install command."""
    try:
        ort = importlib.import_module("onnxruntime")
        nudenet_module = importlib.import_module("nudenet.nudenet")
    except ImportError as exc:
        raise BackendMissing(f"NudeNet is not available ({exc}). Install it: {INSTALL_HINT}") from exc
    if not hasattr(nudenet_module, "NudeDetector"):
        raise BackendMissing(f"the installed nudenet has no NudeDetector (need nudenet 3.x): {INSTALL_HINT}")
    return ort, nudenet_module


def model_path(name: str) -> str:
    """The file of a model choice (the bundled one lives in the nudenet package).

    Raises:
        BackendMissing: the bundled model was asked for and nudenet is not installed.
        FileNotFoundError: no such file in ``models/nudenet``.
    """
    if name == BUNDLED_MODEL:
        return bundled_model_path()
    import folder_paths

    path = folder_paths.get_full_path(FOLDER_NAME, name)
    if path is None or not os.path.isfile(path):
        roots = folder_paths.get_folder_paths(FOLDER_NAME)
        raise FileNotFoundError(f"no NudeNet model {name!r} in {roots}")
    return path


def bundled_model_path() -> str:
    """The ``320n.onnx`` shipped inside the nudenet package."""
    _, nudenet_module = _import_backend()
    path = os.path.join(os.path.dirname(nudenet_module.__file__), BUNDLED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the nudenet package has no {BUNDLED_FILE} ({path}); reinstall nudenet")
    return path


def choose_providers(available: Sequence[str], device: str, torch_device_type: str,
                     device_index: Optional[int] = None) -> list[Any]:
    """onnxruntime providers for ``device`` ("auto" or "cpu"), GPU first when usable.

    ``auto`` takes the first of :data:`GPU_PROVIDERS` that onnxruntime offers, unless ComfyUI
    itself runs on the CPU (``torch_device_type == "cpu"``, e.g. ``--cpu``); the CPU provider
    always comes last as the fallback.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    providers: list[Any] = []
    if device == "auto" and torch_device_type != "cpu":
        for name in GPU_PROVIDERS:
            if name in available:
                if name in _DEVICE_ID_PROVIDERS:
                    providers.append((name, {"device_id": int(device_index or 0)}))
                else:
                    providers.append(name)
                break
    providers.append(CPU_PROVIDER)
    return providers


def _provider_names(providers: Sequence[Any]) -> tuple[str, ...]:
    return tuple(p[0] if isinstance(p, tuple) else p for p in providers)


@dataclass(frozen=True)
class Detector:
    """A NudeDetector bound to one session and one inference resolution."""

    detector: Any
    model: str
    path: str
    resolution: int
    providers: tuple[str, ...]
    """The providers the session actually uses (onnxruntime may have fallen back to the CPU)."""

    def detect(self, bgr_images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """NudeNet's detections for uint8 BGR ``[H, W, 3]`` arrays, one list per image."""
        if not bgr_images:
            return []
        return self.detector.detect_batch(list(bgr_images), batch_size=len(bgr_images))


_sessions = LockedLRU(MAX_SESSIONS)
_build_lock = threading.Lock()
"""Held while a session is looked up and built, so two threads never start the same model twice."""


def open_session(ort: Any, path: str, providers: list[Any]) -> Any:
    """The cached InferenceSession of ``path`` for these providers (built on first use; the
    ``MAX_SESSIONS`` most recently used are kept, per file stamp and providers)."""
    key = file_stamp(os.path.realpath(path)) + (_provider_names(providers),)

    def build() -> Any:
        try:
            session = ort.InferenceSession(path, providers=providers)
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises several types) - re-raised below
            if _provider_names(providers) == (CPU_PROVIDER,):
                raise
            log.warning("NudeNet: could not start onnxruntime with %s (%s); using the CPU",
                        _provider_names(providers)[0], exc)
            session = ort.InferenceSession(path, providers=[CPU_PROVIDER])
        log.info("NudeNet: loaded %s with %s", path, session.get_providers())
        return session

    with _build_lock:
        return _sessions.get_or_build(key, build)


def resolve_resolution(requested: int, model: str, session: Any) -> int:
    """The inference resolution: ``requested``, or for 0 (auto) the model's fixed input size,
    else the number in its file name (``640m.onnx`` -> 640), else 320."""
    if requested > 0:
        return int(requested)
    shape = session.get_inputs()[0].shape
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0:
        return int(shape[2])
    if model != BUNDLED_MODEL:
        match = re.search(r"(\d{3,4})", os.path.basename(model))
        if match and int(match.group(1)) % 32 == 0:
            return int(match.group(1))
    return DEFAULT_RESOLUTION


def make_detector(nudenet_module: Any, session: Any, model: str, path: str, resolution: int) -> Detector:
    """A :class:`Detector` around an existing session.

    ``NudeDetector.__init__`` builds its own CPU-only session (and on older onnxruntime-gpu fails
    without providers): the instance is made around the shared session instead, with the
    attributes its ``detect``/``detect_batch`` read (nudenet 3.x).
    """
    detector = nudenet_module.NudeDetector.__new__(nudenet_module.NudeDetector)
    detector.onnx_session = session
    detector.input_name = session.get_inputs()[0].name
    detector.input_width = resolution
    detector.input_height = resolution
    return Detector(detector=detector, model=model, path=path, resolution=resolution,
                    providers=tuple(session.get_providers()))


def load_detector(model: str, resolution: int = 0, device: str = "auto") -> Detector:
    """A :class:`Detector` for a model choice; the session is shared per (file, providers).

    Raises:
        BackendMissing: nudenet/onnxruntime missing. FileNotFoundError: no such model file.
        ValueError: a resolution that is not a positive multiple of 32 (0 = auto).
    """
    import comfy.model_management

    torch_device = comfy.model_management.get_torch_device()
    return open_detector(model_path(model), model, resolution, device, torch_device.type,
                         getattr(torch_device, "index", None))


def open_detector(path: str, model: str, resolution: int = 0, device: str = "auto", torch_device_type: str = "cpu",
                  device_index: Optional[int] = None) -> Detector:
    """A :class:`Detector` for the model file ``path`` without ComfyUI (the evaluation tool, the
    benchmarks); ``torch_device_type`` stands in for ComfyUI's device when choosing providers.

    Raises:
        BackendMissing, ValueError: as :func:`load_detector`.
    """
    if resolution < 0 or resolution % 32:
        raise ValueError(f"inference_resolution {resolution} must be 0 (auto) or a multiple of 32")
    ort, nudenet_module = _import_backend()
    providers = choose_providers(ort.get_available_providers(), device, torch_device_type, device_index)
    session = open_session(ort, path, providers)
    return make_detector(nudenet_module, session, model, path, resolve_resolution(int(resolution), model, session))


def to_bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """ComfyUI IMAGE ``[B, H, W, 3]`` float RGB in 0..1 -> B contiguous uint8 BGR arrays,
    rounded like ComfyUI's Save Image (``clip(255 * x, 0, 255).astype(uint8)``)."""
    array = images.detach().to("cpu", torch.float32).numpy()
    u8 = np.clip(255.0 * array, 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(img[..., ::-1]) for img in u8]


def detect_images(detector: Detector, images: torch.Tensor, batch_size: int = DETECT_BATCH,
                  on_chunk: Optional[Callable[[int], None]] = None) -> list[list[dict[str, Any]]]:
    """Detections for an RGB IMAGE batch, ``batch_size`` images per onnxruntime call.

    ``on_chunk(n)`` is called after each chunk of ``n`` images (progress bar; it may raise to
    stop, e.g. ComfyUI's interrupt).
    """
    results: list[list[dict[str, Any]]] = []
    step = max(1, int(batch_size))
    for start in range(0, int(images.shape[0]), step):
        chunk = images[start:start + step]
        results.extend(detector.detect(to_bgr_uint8(chunk)))
        if on_chunk is not None:
            on_chunk(int(chunk.shape[0]))
    return results
