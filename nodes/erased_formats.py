"""Concept-erased weight files: safe reading, unwrapping, key-space sniffing and a parsed cache.

No ComfyUI import here (pure Python + torch + safetensors): what depends on the runtime (the
diffusers -> LDM map, the model's and CLIP's state dicts, patching) lives in
:mod:`.erased_model`.  Errors are :class:`WeightFormatError`; the node wraps them in its
``NodeInputError``.

What is read (docs: README "Concept-erased models"):

* containers - ``.safetensors`` (only the tensors that will be used are read), pickled
  ``.pt/.pth/.ckpt/.bin`` loaded with ``torch.load(weights_only=True)`` (a pickle that needs any
  global outside torch's allowlist and a few inert training-metadata classes is refused, never
  unpickled unsafely), and folders: a diffusers UNet (``config.json`` +
  ``diffusion_pytorch_model.*``, also sharded), a diffusers pipeline (``unet/`` and, when asked
  for, ``text_encoder/`` / ``text_encoder_2/``) or a transformers ``CLIPTextModel`` folder;
* wrappers - ``{'state_dict': ...}`` and single-entry dicts are unwrapped, nested dicts of
  tensors flattened, non-tensor entries (``global_step``, optimizer state ...) dropped;
* key spaces - LDM (``model.diffusion_model.*``), ComfyUI (``diffusion_model.*``), bare LDM
  (``input_blocks.*`` ...), diffusers UNet (``down_blocks.*`` ..., also under ``unet.``), CLIP
  text encoders in transformers names (``text_model.*``, under ``text_encoder.`` or an LDM
  ``cond_stage_model.transformer.`` prefix, and AdvUnlearn's alias copies ``embedding.*``,
  ``encoder.layers.*``, ``final_layer_norm.*``), open_clip text encoders of SD2/SDXL
  checkpoints, and LoRA files (left to ComfyUI's LoRA loader).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import psutil
import safetensors
import safetensors.torch
import torch

from .files import LockedLRU, OutsideRoot, confined, file_stamp, within

log = logging.getLogger(__name__)

FILE_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin")
TE_MODES = ("auto", "apply", "ignore")

DIFFUSERS_UNET_ROOTS = frozenset({"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
                                  "time_embedding", "add_embedding", "class_embedding"})
LDM_UNET_ROOTS = frozenset({"input_blocks", "middle_block", "output_blocks", "time_embed", "out", "label_emb"})
#: AdvUnlearn's alias copies of CLIPTextModel sub-modules -> their transformers names.
TE_ALIASES = (("embedding.", "text_model.embeddings."), ("embeddings.", "text_model.embeddings."),
              ("encoder.layers.", "text_model.encoder.layers."), ("final_layer_norm.", "text_model.final_layer_norm."))
#: Substrings that only LoRA-family files (LoRA, LoCon, LoHa, LoKr) have in their key names.
LORA_MARKERS = ("lora_up", "lora_down", "lora_A.", "lora_B.", "lora.up.", "lora.down.", "lora_mid", "hada_w1_",
                "lokr_w1", "lora_linear_layer", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights"})
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, IndexError, struct.error, zipfile.BadZipFile)
_READ_ERRORS += (safetensors.SafetensorError,) if hasattr(safetensors, "SafetensorError") else ()


class WeightFormatError(ValueError):
    """The file or folder cannot be used; the message says why and what to do."""


# ------------------------------------------------------------------------------ key spaces


@dataclass(frozen=True)
class KeyClass:
    """What one key of a file is.

    ``group``: ``unet`` (``space`` "ldm" or "diffusers", ``key`` relative to the UNet),
    ``te`` (transformers CLIP name, ``space`` = encoder hint "l"/"g"/"h" or ""), ``te_openclip``
    (open_clip name), ``lora``, ``ignored`` (``reason`` says why) or ``unknown``.
    """

    group: str
    key: str = ""
    space: str = ""
    reason: str = ""
    alias: bool = False


def _unet_class(key: str) -> Optional[KeyClass]:
    root = key.split(".", 1)[0]
    if root in DIFFUSERS_UNET_ROOTS:
        return KeyClass("unet", key, "diffusers")
    if root in LDM_UNET_ROOTS:
        return KeyClass("unet", key, "ldm")
    return None


def _te_class(key: str, hint: str) -> Optional[KeyClass]:
    if key.startswith("text_model.") or key.startswith("text_projection"):
        return KeyClass("te", key, hint)
    for alias, canonical in TE_ALIASES:
        if key.startswith(alias):
            return KeyClass("te", canonical + key[len(alias):], hint, alias=True)
    return None


def _ldm_te_class(rest: str, hint: str) -> KeyClass:
    """``cond_stage_model.transformer.<rest>``: older transformers saved without ``text_model.``."""
    if not rest.startswith("text_model.") and rest.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
        rest = "text_model." + rest
    return KeyClass("te", rest, hint)


_VAE = "VAE weights (concept erasure does not change the VAE)"
_EMA = "EMA copy (the trained weights are used)"
_SCHED = "noise-schedule buffer"


def classify_key(key: str, component: str = "") -> KeyClass:
    """The :class:`KeyClass` of ``key``; ``component`` is a diffusers folder's sub-folder name."""
    k = key[len("module."):] if key.startswith("module.") else key
    if any(marker in k for marker in LORA_MARKERS):
        return KeyClass("lora", k)
    if component == "unet":
        return _unet_class(k) or KeyClass("unknown", k)
    if component in ("text_encoder", "text_encoder_2"):
        return _te_class(k, "l" if component == "text_encoder" else "g") or KeyClass("unknown", k)
    prefixes: tuple[tuple[str, Callable[[str], Optional[KeyClass]]], ...] = (
        ("model.diffusion_model.", lambda r: KeyClass("unet", r, "ldm")),
        ("diffusion_model.", lambda r: KeyClass("unet", r, "ldm")),
        ("first_stage_model.", lambda r: KeyClass("ignored", r, reason=_VAE)),
        ("vae.", lambda r: KeyClass("ignored", r, reason=_VAE)),
        ("model_ema.", lambda r: KeyClass("ignored", r, reason=_EMA)),
        ("cond_stage_model.transformer.", lambda r: _ldm_te_class(r, "l")),
        ("cond_stage_model.model.", lambda r: KeyClass("te_openclip", r, "h")),
        ("conditioner.embedders.0.transformer.", lambda r: _ldm_te_class(r, "l")),
        ("conditioner.embedders.1.model.", lambda r: KeyClass("te_openclip", r, "g")),
        ("text_encoder_2.", lambda r: _te_class(r, "g")),
        ("text_encoder.", lambda r: _te_class(r, "l")),
        ("unet.", _unet_class),
    )
    for prefix, rule in prefixes:
        if k.startswith(prefix):
            return rule(k[len(prefix):]) or KeyClass("unknown", k)
    found = _unet_class(k) or _te_class(k, "")
    if found is not None:
        return found
    if k in SCHEDULE_BUFFERS or k.startswith("model.") and k[len("model."):] in SCHEDULE_BUFFERS:
        return KeyClass("ignored", k, reason=_SCHED)
    return KeyClass("unknown", k)


EMA_BOOKKEEPING = frozenset({"decay", "num_updates"})


def classify_keys(keys: Iterable[str], component: str = "") -> dict[str, KeyClass]:
    """:func:`classify_key` for every key, then EMA promotion: a file whose only UNet weights are
    the EMA copy (``model_ema.<name without dots>``, LDM's ``LitEma``) has those as its model, so
    they become ``unet`` keys of space ``ema`` (the dots are restored against the target model's
    keys in :func:`nodes.erased_model.match_unet`).  With regular UNet weights present the EMA copy
    stays ignored, as every loader does."""
    classes = {k: classify_key(k, component) for k in keys}
    if any(c.group == "unet" for c in classes.values()):
        return classes
    for k, cls in classes.items():
        if cls.reason == _EMA and cls.key not in EMA_BOOKKEEPING:
            classes[k] = KeyClass("unet", cls.key, "ema")
    return classes


# ------------------------------------------------------------------------------ safe reading


class _InertObject:
    """Stands in for a training-metadata object (e.g. a Lightning ``ModelCheckpoint`` callback)
    found in a checkpoint: it takes the pickled state and does nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _extra_safe_globals() -> list[Any]:
    """Globals that are safe to resolve while unpickling: numpy scalar/dtype reconstruction and
    inert stand-ins for the callbacks PyTorch Lightning stores in ``.ckpt`` files."""
    extra: list[Any] = [(_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                        (_InertObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")]
    try:
        import codecs

        import numpy as np

        extra += [np.dtype, codecs.encode]
        extra += [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
        try:
            from numpy._core.multiarray import scalar  # numpy >= 2
        except ImportError:
            from numpy.core.multiarray import scalar  # type: ignore[no-redef]
        extra.append(scalar)
    except ImportError:
        log.debug("numpy is not importable; numpy scalars in pickles will be refused")
    return extra


def _unsafe_globals_message(path: str, err: Exception) -> str:
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        try:
            names = list(getter(path))
        except (ValueError, RuntimeError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as inner:
            # legacy (non-zip) pickles are not supported by the lister: the error message is parsed
            log.debug("could not list the globals of %s: %r", path, inner)
    if not names:
        text = str(err)
        for marker in ("GLOBAL ", "global "):
            if marker in text:
                names = [text.split(marker, 1)[1].split()[0].rstrip(".,`'\"")]
                break
    what = (f"needs {', '.join(names[:5])} to load" if names else
            "uses pickle features outside PyTorch's safe weights-only loader (e.g. a plain pickle.dump)")
    return (f"'{os.path.basename(path)}' is a pickle that {what}. Unpickling it could run code from the file, so it "
            "is refused (it was not executed). Convert it to .safetensors on a machine where you trust it, or get "
            "a .safetensors release of these weights.")


def _sniff(path: str) -> str:
    """``safetensors``, ``zip-pickle``, ``pickle`` or ``unknown`` from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _load_pickle(path: str) -> Any:
    kind = _sniff(path)
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if kind == "zip-pickle":
        kwargs["mmap"] = True  # only the tensors that are used get paged in
    safe_ctx = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_ctx is not None:
            with safe_ctx(_extra_safe_globals()):
                return torch.load(path, **kwargs)
        return torch.load(path, **kwargs)
    except MemoryError:
        raise
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
            raise WeightFormatError(_unsafe_globals_message(path, err)) from err
        detail = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else ""
        raise WeightFormatError(f"cannot read '{os.path.basename(path)}' as a PyTorch pickle: the file is corrupt, "
                                f"truncated or not a weights file ({type(err).__name__}: {detail}). "
                                "Download it again.") from err


def _flatten(obj: Any, notes: list[str]) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` / single-entry wrappers, flatten nested dicts of tensors and
    drop non-tensor entries (noted)."""
    depth = 0
    while isinstance(obj, Mapping) and depth < 4:
        inner = obj.get("state_dict")
        if isinstance(inner, Mapping):
            dropped = [k for k in obj if k != "state_dict"]
            notes.append("unwrapped {'state_dict': ...}" + (f" (ignored {', '.join(map(str, dropped[:4]))})"
                                                             if dropped else ""))
            obj, depth = inner, depth + 1
            continue
        dicts = [k for k, v in obj.items() if isinstance(v, Mapping)]
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        if len(dicts) == 1 and not tensors and dicts[0] in ("model", "module", "unet", "params", "weights", "ema"):
            notes.append(f"unwrapped {{'{dicts[0]}': ...}}")
            obj, depth = obj[dicts[0]], depth + 1
            continue
        break
    if not isinstance(obj, Mapping):
        raise WeightFormatError(f"the file holds a {type(obj).__name__}, not a state dict of tensors.")
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []

    def walk(mapping: Mapping[Any, Any], prefix: str, level: int) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                out[name] = value
            elif isinstance(value, Mapping) and level < 3 and any(isinstance(v, (torch.Tensor, Mapping))
                                                                  for v in value.values()):
                walk(value, name + ".", level + 1)
            else:
                skipped.append(name)

    walk(obj, "", 0)
    if skipped:
        notes.append(f"dropped {len(skipped)} non-tensor entries ({', '.join(skipped[:4])}"
                     f"{', ...' if len(skipped) > 4 else ''})")
    return out


@dataclass(frozen=True)
class Part:
    """One state dict read from one file (or shard set): a whole file or a folder component."""

    component: str
    path: str
    container: str
    classes: Mapping[str, KeyClass]
    tensors: Mapping[str, torch.Tensor]
    notes: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _wanted(classes: Mapping[str, KeyClass], te_mode: str) -> Callable[[str], bool]:
    groups = Counter(c.group for c in classes.values())
    if groups["lora"]:
        return lambda k: True
    want_te = te_mode == "apply" or (te_mode == "auto" and not groups["unet"])
    keep = {"unet"} | ({"te", "te_openclip"} if want_te else set())
    return lambda k: classes[k].group in keep


def _read_safetensors(path: str, component: str, te_mode: str) -> Part:
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            metadata = dict(fh.metadata() or {})
            classes = classify_keys(keys, component)
            wanted = _wanted(classes, te_mode)
            # copied out of the memory map: a file rewritten in place must not change (or, truncated,
            # crash) models already patched from it
            tensors = {k: fh.get_tensor(k).clone() for k in keys if wanted(k)}
    except _READ_ERRORS as err:
        raise WeightFormatError(f"cannot read '{os.path.basename(path)}' as safetensors: the file is corrupt or "
                                f"truncated ({str(err)[:160]}). Download it again.") from err
    return Part(component, path, "safetensors", classes, tensors, (), metadata)


def _read_pickle(path: str, component: str, te_mode: str) -> Part:
    notes: list[str] = []
    flat = _flatten(_load_pickle(path), notes)
    classes = classify_keys(flat, component)
    wanted = _wanted(classes, te_mode)
    tensors = {k: v.clone() for k, v in flat.items() if wanted(k)}  # owned memory, not the file's map
    return Part(component, path, "pickle, loaded safely: weights only", classes, tensors, tuple(notes), {})


def read_file(path: str, component: str = "", te_mode: str = "auto") -> Part:
    """Read one weights file (the container is sniffed from its first bytes, not its name)."""
    try:
        kind = _sniff(path)
    except OSError as err:
        raise WeightFormatError(f"cannot open '{os.path.basename(path)}' ({err}).") from err
    if kind == "safetensors":
        return _read_safetensors(path, component, te_mode)
    if kind in ("zip-pickle", "pickle"):
        return _read_pickle(path, component, te_mode)
    if os.path.getsize(path) == 0:
        raise WeightFormatError(f"'{os.path.basename(path)}' is empty (an interrupted download?). Download it again.")
    raise WeightFormatError(f"'{os.path.basename(path)}' is neither safetensors nor a PyTorch pickle (unknown "
                            "format). Supported: .safetensors, .pt/.pth/.ckpt/.bin and diffusers folders.")


def _merge_parts(parts: list[Part]) -> Part:
    first = parts[0]
    classes: dict[str, KeyClass] = {}
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = [f"{len(parts)} shards"]
    for part in parts:
        classes.update(part.classes)
        tensors.update(part.tensors)
        notes.extend(part.notes)
    return Part(first.component, os.path.dirname(first.path), first.container, classes, tensors, tuple(notes),
                first.metadata)


# ------------------------------------------------------------------------------ folders

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _inside(folder: str, name: str) -> str:
    try:
        return confined(folder, name)
    except OutsideRoot as err:
        raise WeightFormatError(f"'{name}' in {folder} points outside the folder; refused.") from err


def weight_files(folder: str) -> list[str]:
    """The weight file(s) of a diffusers/transformers component folder, in load order."""
    for ext in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            single = os.path.join(folder, stem + ext)
            if os.path.isfile(single):
                return [single]
            index = single + ".index.json"
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as fh:
                        shards = sorted(set(json.load(fh)["weight_map"].values()))
                except (OSError, ValueError, KeyError, TypeError) as err:
                    raise WeightFormatError(f"cannot read the shard index {index} ({err}).") from err
                return [_inside(folder, shard) for shard in shards]
    for ext in (".safetensors", ".bin"):  # variants: diffusion_pytorch_model.fp16.safetensors ...
        for stem in _WEIGHT_STEMS:
            variants = sorted(f for f in os.listdir(folder) if f.startswith(stem + ".") and f.endswith(ext)
                              and not f.endswith(".index.json"))
            if variants:
                return [os.path.join(folder, variants[0])]
    return []


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise WeightFormatError(f"cannot read {path} ({err}).") from err
    return data if isinstance(data, dict) else {}


def folder_kind(folder: str) -> str:
    """``pipeline``, ``unet``, ``text_encoder`` or ``unknown``."""
    if os.path.isfile(os.path.join(folder, "model_index.json")) or os.path.isdir(os.path.join(folder, "unet")):
        return "pipeline"
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        data = _read_json(config)
        arch = " ".join(map(str, data.get("architectures") or [])) + " " + str(data.get("model_type", ""))
        if "CLIPText" in arch or "clip_text" in arch:
            return "text_encoder"
        if "UNet" in str(data.get("_class_name", "")) or any(
                f.startswith("diffusion_pytorch_model") for f in os.listdir(folder)):
            return "unet"
    return "unknown"


def is_weights_folder(folder: str) -> bool:
    """Whether a directory is a loadable folder (pipeline, UNet or text encoder)."""
    try:
        return folder_kind(folder) != "unknown"
    except WeightFormatError:
        return False


def _read_component(folder: str, component: str, te_mode: str) -> Part:
    files = weight_files(folder)
    if not files:
        raise WeightFormatError(f"{folder} has no weights file (diffusion_pytorch_model.safetensors/.bin, "
                                "model.safetensors or pytorch_model.bin). Copy the complete folder.")
    parts = [read_file(f, component, te_mode) for f in files]
    return parts[0] if len(parts) == 1 else _merge_parts(parts)


@dataclass(frozen=True)
class WeightSource:
    """Everything read from one dropdown entry."""

    path: str
    kind: str
    parts: tuple[Part, ...]
    notes: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.parts[0].metadata if self.parts else {}


def _read_source(path: str, te_mode: str) -> WeightSource:
    if os.path.isfile(path):
        part = read_file(path, "", te_mode)
        return WeightSource(path, "file", (part,))
    kind = folder_kind(path)
    if kind == "unet":
        return WeightSource(path, "diffusers UNet folder", (_read_component(path, "unet", te_mode),))
    if kind == "text_encoder":
        if te_mode == "ignore":
            raise WeightFormatError("this folder is a text encoder only (e.g. AdvUnlearn), and text_encoder is "
                                    "'ignore'. Set text_encoder to 'auto' or 'apply' and connect the CLIP.")
        return WeightSource(path, "transformers CLIP text-encoder folder",
                            (_read_component(path, "text_encoder", "apply"),))
    if kind == "pipeline":
        parts, notes = [], []
        unet_dir = os.path.join(path, "unet")
        if os.path.isdir(unet_dir):
            parts.append(_read_component(unet_dir, "unet", te_mode))
        for name in ("text_encoder", "text_encoder_2"):
            sub = os.path.join(path, name)
            if not os.path.isdir(sub):
                continue
            if te_mode == "apply" or (te_mode == "auto" and not parts):
                parts.append(_read_component(sub, name, "apply"))
            else:
                notes.append(f"{name}/ not applied (text_encoder = {te_mode}; choose 'apply' to use it)")
        others = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                        and d not in ("unet", "text_encoder", "text_encoder_2") and not d.startswith("."))
        if others:
            notes.append(f"ignored sub-folders: {', '.join(others)}")
        if not parts:
            raise WeightFormatError("this diffusers pipeline folder has no unet/ (nor a text encoder to apply).")
        return WeightSource(path, "diffusers pipeline folder", tuple(parts), tuple(notes))
    raise WeightFormatError("this folder is not a diffusers UNet folder (config.json + diffusion_pytorch_model.*), "
                            "a diffusers pipeline (model_index.json, unet/) or a CLIPTextModel folder (unknown "
                            "format). Point at the folder that holds the weights.")


# ------------------------------------------------------------------------------ the cache


def source_fingerprint(path: str) -> tuple:
    """(path, size, mtime_ns) of the file, or of every file in the folder tree (depth <= 2)."""
    if os.path.isfile(path):
        return (file_stamp(path),)
    entries = []
    for root, dirs, files in os.walk(path):
        depth = 0 if root == path else os.path.relpath(root, path).count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < 2 else []
        for name in sorted(files):
            entries.append(file_stamp(os.path.join(root, name)))
    return tuple(entries)


CACHE_BUDGET_BYTES = 2 * 2**30
"""At most this many bytes of parsed tensors are kept between runs (less on small machines)."""


def cache_budget_bytes() -> int:
    """Bytes of parsed tensors kept between runs: 2 GiB, or an eighth of the RAM if that is less."""
    return min(CACHE_BUDGET_BYTES, psutil.virtual_memory().total // 8)


class SourceCache:
    """LRU of parsed :class:`WeightSource` objects keyed by (path, mode, files' size + mtime),
    bounded by the bytes of the tensors it holds.  Entries are immutable and shared."""

    def __init__(self, budget: Optional[Callable[[], int]] = None):
        self._entries = LockedLRU()
        self._budget = budget or cache_budget_bytes

    def get(self, path: str, te_mode: str) -> tuple[WeightSource, bool]:
        """``(source, cached)``: the parsed entry, read now or taken from the cache."""
        key = (os.path.realpath(path), te_mode, source_fingerprint(path))
        cached = self._entries.get(key)
        if cached is not None:
            return cached, True
        source = _read_source(path, te_mode)
        budget = self._budget()
        # the file changed: drop its old versions
        self._entries.discard(lambda k: k[0] == key[0] and k[1] == te_mode)
        if source.nbytes <= budget:
            self._entries.put(key, source, over_budget=lambda values: sum(s.nbytes for s in values) > budget)
        else:
            log.info("not caching %s: %.0f MiB of tensors exceed the cache budget of %.0f MiB",
                     path, source.nbytes / 2**20, budget / 2**20)
        return source, False

    @property
    def hits(self) -> int:
        return self._entries.hits

    @property
    def misses(self) -> int:
        return self._entries.misses

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


CACHE = SourceCache()


def list_entries(roots: Iterable[str], max_depth: int = 4) -> list[str]:
    """Dropdown entries: weight files and loadable folders under each root (relative, '/'-joined).

    A folder recognised as a diffusers/transformers folder is listed once and not descended into.
    """
    names: list[str] = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        base = os.path.realpath(root)
        for current, dirs, files in os.walk(root, followlinks=True):
            rel_dir = os.path.relpath(current, root)
            depth = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
            keep_dirs = []
            for d in sorted(dirs):
                full = os.path.join(current, d)
                if d.startswith(".") or not within(base, full):
                    continue
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if is_weights_folder(full):
                    if rel not in names:
                        names.append(rel)
                elif depth + 1 < max_depth:
                    keep_dirs.append(d)
            dirs[:] = keep_dirs
            for f in sorted(files):
                if f.startswith(".") or not f.lower().endswith(FILE_EXTENSIONS):
                    continue
                if not within(base, os.path.join(current, f)):
                    continue  # a symlink leading outside the root: the loader would refuse it
                rel = os.path.relpath(os.path.join(current, f), root).replace(os.sep, "/")
                if rel not in names:
                    names.append(rel)
    return sorted(names, key=str.lower)


def receler_like(parts: Iterable[Part]) -> bool:
    """Receler's adapter "erasers" (their own modules, not weights of the base model)."""
    return any("eraser" in k.lower() for part in parts for k in part.classes)
