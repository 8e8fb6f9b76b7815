"""The NEGATION_SET object: raw VAE latents of unwanted images, their cache and their files.

Flow of a negation latent: image folder -> VAE encode -> raw latents (cached ``.safetensors``)
-> :class:`NegationSet` -> at sampling time ``process_in`` + resize + device/dtype (cached per
shape) -> the guidance hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import folder_paths

from .image_decode import (DECODE_VERSION, IMAGE_EXTENSIONS, ImageDecodeError, UnreadableImageError,
                           decode_image)
from .comfy_compat import NodeInputError, check_interrupt, latent_format_key, process_in, progress_bar
from .files import LockedLRU, file_stamp
from .guidance_modes import GuidanceMode, guidance_mode
from .paths import atomic_save, register_model_folder, resolve_in_roots

__all__ = ["atomic_save"]  # re-exported: negation_set_nodes imports it from here

log = logging.getLogger(__name__)

FOLDER_NAME = "negation_sets"
INPUT_PREFIX = "input/"
CACHE_DIRNAME = ".negation_cache"
CACHE_VERSION = 1
ENCODE_SEED = 0
"""Seed for VAEs that sample their posterior (older ComfyUI), so caches are reproducible."""
_READ_ERRORS = (OSError, ValueError, RuntimeError) + (
    (safetensors.SafetensorError,) if hasattr(safetensors, "SafetensorError") else ())
MAX_PREPARED = 4
"""Prepared (shape, device, dtype) variants kept per set."""


@dataclass(frozen=True)
class BuiltinSet:
    """A negation set the pack provides without files on disk (the digits demo's sets).

    ``images()`` gives ``[N, H, W, 3]`` float pixels in 0..1; ``fingerprint`` changes when they do.
    Listed in Load Negation Set's dropdown unless a real entry has the same name (which wins).
    """

    name: str
    images: Callable[[], np.ndarray]
    fingerprint: Callable[[], str]
    source: str


BUILTIN_SETS: dict[str, BuiltinSet] = {}


def register_builtin_set(entry: BuiltinSet) -> None:
    """Make a built-in set available by name (in memory only: nothing is written)."""
    BUILTIN_SETS[entry.name] = entry


def builtin_set(name: Any) -> Optional[BuiltinSet]:
    """The built-in set ``name`` when no real entry of the negation_sets roots has that name."""
    entry = BUILTIN_SETS.get(name) if isinstance(name, str) else None
    if entry is None:
        return None
    if any(os.path.exists(os.path.join(root, name)) for root in set_roots()):
        return None
    return entry


def register_folder() -> None:
    """Register ``models/negation_sets`` (keeping dirs that extra_model_paths.yaml added)."""
    register_model_folder(FOLDER_NAME, {".safetensors"})


def set_roots() -> list[str]:
    """Directories that hold negation sets, in lookup order."""
    return [p for p in folder_paths.get_folder_paths(FOLDER_NAME)]


# ------------------------------------------------------------------------------ the object


@dataclass(frozen=True)
class PreparedNegation:
    """Negation latents ready for the kernels: ``y`` is ``[N, D]`` on the sampling device.

    ``y_sq`` is ``[N]`` (``||y_n||^2``); ``ref_mean`` / ``ref_var`` are ``[D]`` float32: each
    channel's mean and variance over the set (pooled over images and pixels), broadcast to every
    pixel, the reference data density of :func:`kernels.guidance.beta_estimate`.
    """

    y: torch.Tensor
    y_sq: torch.Tensor
    ref_mean: torch.Tensor
    ref_var: torch.Tensor


class NegationSet:
    """Raw VAE latents ``[N, C, H, W]`` (before ``process_in``) plus metadata.

    Immutable once built (outputs are shared between nodes and prompts); conversions to a
    model's sampling space are memoised per (latent format, size, device, dtype, variant).
    """

    def __init__(self, latents: torch.Tensor, meta: dict[str, Any]):
        if latents.ndim != 4 or latents.shape[0] < 1:
            raise ValueError(f"negation latents must be [N, C, H, W] with N >= 1, got {list(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("negation latents contain NaN or infinite values")
        self.latents = latents.detach().to("cpu", torch.float32).contiguous()
        self.meta = dict(meta)
        self._prepared = LockedLRU(MAX_PREPARED)

    def __deepcopy__(self, memo: dict) -> "NegationSet":
        return self  # immutable: share, never copy the tensors

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])

    @property
    def channels(self) -> int:
        return int(self.latents.shape[1])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "negation set"))

    def describe(self) -> str:
        _, c, h, w = self.latents.shape
        text = f"'{self.name}' ({self.count} latents, {c}x{h}x{w}, source: {self.meta.get('source', '?')})"
        skipped = int(self.meta.get("skipped") or 0)
        if skipped:
            text += f"; {skipped} unreadable file(s) skipped (named in the log)"
        notes = json.loads(self.meta.get("decode_notes") or "{}")
        if notes:
            shown = [f"{file}: {what}" for file, what in list(notes.items())[:3]]
            more = f" and {len(notes) - 3} more (in the log)" if len(notes) > 3 else ""
            text += f"; decoded specially: {'; '.join(shown)}{more}"
        return text

    def sampling_latents(self, latent_format: Any, height: int, width: int) -> torch.Tensor:
        """``[N, C, height, width]`` float32 CPU latents in the model's sampling space."""

        def build() -> torch.Tensor:
            lat = process_in(latent_format)(self.latents.clone())
            if lat.shape[-2:] != (height, width):
                log.info("Resizing negation set %s from %dx%d to the sample's %dx%d latent",
                         self.name, lat.shape[-2], lat.shape[-1], height, width)
                lat = F.interpolate(lat, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            return lat.contiguous()

        return self._prepared.get_or_build(("sampling", latent_format_key(latent_format), height, width), build)

    def prepared(self, latent_format: Any, height: int, width: int, device: torch.device,
                 dtype: torch.dtype, variant: str | GuidanceMode = "paper") -> PreparedNegation:
        """Flattened latents for the kernels, memoised per (format, size, device, dtype, variant).

        ``variant`` is a guidance mode or its name (:data:`.guidance_modes.MODES`): the sampling-space
        latents as that mode's kernel reads them (:meth:`.guidance_modes.GuidanceMode.kernel_latents`).
        Raises ValueError for an unknown name.
        """
        mode = guidance_mode(variant)

        def build() -> PreparedNegation:
            lat = mode.kernel_latents(self.sampling_latents(latent_format, height, width))
            y = lat.reshape(lat.shape[0], -1).to(device=device, dtype=dtype)
            pooled = lat.to(torch.float32).transpose(0, 1).reshape(lat.shape[1], -1)  # [C, N*H*W]
            per_pixel = (lat.shape[1], lat.shape[2] * lat.shape[3])
            ref_mean = pooled.mean(1)[:, None].expand(per_pixel).reshape(-1).to(device)
            ref_var = pooled.var(1, correction=0)[:, None].expand(per_pixel).reshape(-1).to(device)
            return PreparedNegation(y=y, y_sq=(y.to(torch.float32) * y.to(torch.float32)).sum(1),
                                    ref_mean=ref_mean, ref_var=ref_var)

        key = ("prepared", latent_format_key(latent_format), height, width, str(device), str(dtype), mode.name)
        return self._prepared.get_or_build(key, build)

    def memo(self, key: tuple, build):
        """Memoise another derived value (e.g. a calibrated threshold) on this set."""
        return self._prepared.get_or_build(("extra",) + key, build)


# ------------------------------------------------------------------------------ names & paths


def list_set_names() -> list[str]:
    """Dropdown entries: sub-folders and ``.safetensors`` files of every negation_sets root,
    then ``input/<folder>`` for sub-folders of the input directory."""
    names: list[str] = []
    for root in set_roots():
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            full = os.path.join(root, entry)
            if entry.startswith("."):
                continue
            if os.path.isdir(full) or entry.lower().endswith(".safetensors"):
                if entry not in names:
                    names.append(entry)
    input_dir = folder_paths.get_input_directory()
    if os.path.isdir(input_dir):
        for entry in sorted(os.listdir(input_dir)):
            if not entry.startswith(".") and os.path.isdir(os.path.join(input_dir, entry)):
                names.append(INPUT_PREFIX + entry)
    names += [name for name in BUILTIN_SETS if name not in names]
    return names


def resolve_set(name: str, node: str) -> str:
    """Absolute path of a dropdown entry, refusing anything outside the allowed roots (built-in
    sets have no path: check :func:`builtin_set` first)."""
    fix = (f"Put the set (a folder of images or a .safetensors file) into models/{FOLDER_NAME}/ or a sub-folder "
           "of the input directory, refresh the browser and choose it from the list.")
    rel = name.replace("\\", "/") if isinstance(name, str) else name
    roots = set_roots()
    if isinstance(rel, str) and rel.startswith(INPUT_PREFIX):
        rel, roots = rel[len(INPUT_PREFIX):], [folder_paths.get_input_directory()]
    return resolve_in_roots(rel, roots, node, what="negation set", fix=fix)


def fingerprint_entry(name: str, node: str) -> str:
    """Cheap change marker for IS_CHANGED: (file, size, mtime) of the set's files (a name that does
    not resolve gives the error ``node``'s message would show)."""
    builtin = builtin_set(name)
    if builtin is not None:
        return f"builtin:{name}:{builtin.fingerprint()}"
    try:
        path = resolve_set(name, node)
    except NodeInputError as err:
        return f"error:{err}"
    if os.path.isfile(path):
        return ":".join(str(v) for v in file_stamp(path))
    parts = []
    for file in image_files(path):
        _, size, mtime_ns = file_stamp(file)
        parts.append(f"{os.path.basename(file)}:{size}:{mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------ hashing


_FILE_HASHES = LockedLRU()
_VAE_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def image_files(folder: str) -> list[str]:
    """Image files directly inside ``folder`` (sorted by name; dot-files and the cache skipped)."""
    out = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if not entry.startswith(".") and entry.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full):
            out.append(full)
    return out


def file_sha256(path: str) -> str:
    """Content hash of a file, memoised on (path, size, mtime_ns)."""

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    return _FILE_HASHES.get_or_build(file_stamp(path), digest)


def vae_fingerprint(vae: Any) -> str:
    """Identity of a VAE's weights: names, shapes, dtypes and a strided sample of every tensor."""
    try:
        cached = _VAE_FINGERPRINTS.get(vae)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    module = vae.first_stage_model
    h = hashlib.sha256(type(module).__name__.encode())
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu", torch.float32).numpy()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.tobytes())
    digest = h.hexdigest()
    try:
        _VAE_FINGERPRINTS[vae] = digest
    except TypeError:
        log.debug("VAE object %r cannot be weak-referenced; its fingerprint is not memoised", type(vae))
    return digest


# ------------------------------------------------------------------------------ images -> latents


def load_image(path: str, resolution: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``([resolution, resolution, 3] float in 0..1, decode notes)``: the picture as a person sees
    it (:func:`.image_decode.decode_image`), centre-cropped to a square and resized (Lanczos, on
    the float pixels, so 16-bit precision is kept until the VAE)."""
    decoded = decode_image(path)
    return fit_pixels(decoded.pixels, resolution), decoded.notes


def fit_pixels(pixels: np.ndarray, resolution: int) -> torch.Tensor:
    """``[H, W, 3]`` float pixels -> ``[resolution, resolution, 3]``: centre-cropped to a square and
    resized with Lanczos on the float values (per channel)."""
    channels = [Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32)) for c in range(3)]
    fitted = [np.asarray(ImageOps.fit(ch, (resolution, resolution), method=Image.LANCZOS), dtype=np.float32)
              for ch in channels]
    return torch.from_numpy(np.clip(np.stack(fitted, -1), 0.0, 1.0))


_BUILTIN_ENCODED = LockedLRU(MAX_PREPARED)


def load_builtin_set(entry: BuiltinSet, vae: Any, resolution: int, max_images: int, node: str) -> NegationSet:
    """Encode a built-in set with ``vae`` (memoised in memory per VAE and resolution; no files)."""
    if vae is None:
        raise NodeInputError(node, f"'{entry.name}' is a built-in set of images: connect a VAE (for the digits "
                                   "demo: the vae output of Load Demo Model).")
    key = (entry.name, entry.fingerprint(), vae_fingerprint(vae), resolution)

    def encoded() -> torch.Tensor:
        images = torch.stack([fit_pixels(image, resolution) for image in entry.images()], 0)
        return encode_batches(vae, images.split(4), images.shape[0])

    latents = _BUILTIN_ENCODED.get_or_build(key, encoded)
    if max_images > 0:
        latents = latents[:max_images]
    return NegationSet(latents.clone(), {"name": entry.name, "source": entry.source, "images": int(latents.shape[0]),
                                         "encode_resolution": resolution, "vae": vae_fingerprint(vae)[:16]})


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` centre-cropped to a square and resized to ``resolution``."""
    _, h, w, _ = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = images[:, top:top + side, left:left + side, :].movedim(-1, 1)
    if side != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).movedim(1, -1)


def encode_batches(vae: Any, batches: Iterable[torch.Tensor], total: int) -> torch.Tensor:
    """VAE-encode IMAGE batches with a progress bar; interruptible; deterministic on VAEs that
    sample their posterior."""
    pbar = progress_bar(total)
    out = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(ENCODE_SEED)
        for batch in batches:
            check_interrupt()
            lat = vae.encode(batch[..., :3])
            out.append(lat.detach().to("cpu", torch.float32))
            pbar.update(batch.shape[0])
    return torch.cat(out, 0)


# ------------------------------------------------------------------------------ files


def read_set_file(path: str, node: str) -> NegationSet:
    """Load a precomputed set: tensor ``latents`` [N, C, H, W] (raw VAE latents) + metadata."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            if "latents" not in fh.keys():
                raise NodeInputError(node, f"{os.path.basename(path)} has no tensor named 'latents' (found: "
                                           f"{', '.join(sorted(fh.keys())) or 'none'}). Save sets with Save Negation Set.")
            latents = fh.get_tensor("latents")
    except NodeInputError:
        raise
    except _READ_ERRORS as err:
        raise NodeInputError(node, f"cannot read {os.path.basename(path)} as a safetensors negation set ({err}). "
                                   "The file is corrupt or not a safetensors file; re-create it.") from err
    if latents.ndim != 4 or latents.shape[0] < 1 or not latents.is_floating_point():
        raise NodeInputError(node, f"'latents' in {os.path.basename(path)} has shape {list(latents.shape)} "
                                   f"and dtype {latents.dtype}; expected a float tensor [N, C, H, W] with N >= 1.")
    if not torch.isfinite(latents).all():
        raise NodeInputError(node, f"'latents' in {os.path.basename(path)} contain NaN or infinite values. "
                                   "Re-encode the set from its images.")
    declared = meta.get("latent_channels")
    if declared is not None and declared.isdigit() and int(declared) != latents.shape[1]:
        raise NodeInputError(node, f"{os.path.basename(path)} declares {declared} latent channels but holds "
                                   f"{latents.shape[1]}. The file is inconsistent; re-save it.")
    meta.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    meta.setdefault("source", "precomputed")
    return NegationSet(latents, meta)


def set_metadata(nset: NegationSet) -> dict[str, str]:
    """String metadata for a saved set."""
    meta = {k: str(v) for k, v in nset.meta.items() if v is not None}
    meta.update({"format": "negation_set", "version": str(CACHE_VERSION),
                 "count": str(nset.count), "latent_channels": str(nset.channels)})
    return meta


def _cache_key(files: list[str], hashes: list[str], vae_fp: str, resolution: int) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "files": [[os.path.basename(f), h] for f, h in zip(files, hashes)],
                          "vae": vae_fp, "resolution": resolution, "crop": "center", "seed": ENCODE_SEED,
                          "decode": DECODE_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


def load_image_folder(folder: str, vae: Any, resolution: int, max_images: int, node: str,
                      name: str, batch_size: int = 4) -> NegationSet:
    """Encode (or fetch from the cache) every image in ``folder``.

    The cache lives in ``<folder>/.negation_cache/<key>.safetensors``; the key hashes the image
    files' contents, the VAE's fingerprint and the encode settings, so any change re-encodes and
    an unchanged folder never touches the VAE.
    """
    if vae is None:
        raise NodeInputError(node, f"'{name}' is a folder of images: connect the VAE of the model you sample "
                                   "with so the images can be encoded (only .safetensors sets work without one).")
    files = image_files(folder)
    if not files:
        raise NodeInputError(node, f"the folder '{name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                                   "Add images of the content to avoid.")
    if max_images > 0:
        files = files[:max_images]
    hashes = [file_sha256(f) for f in files]
    key = _cache_key(files, hashes, vae_fingerprint(vae), resolution)
    cache_path = os.path.join(folder, CACHE_DIRNAME, key + ".safetensors")
    if os.path.isfile(cache_path):
        try:
            cached = read_set_file(cache_path, node)
            cached.meta.update({"name": name, "source": "cache"})
            log.info("%s: negation set '%s' loaded from cache %s", node, name, cache_path)
            return cached
        except NodeInputError as err:
            log.warning("%s: cache file %s is unusable (%s); re-encoding the images", node, cache_path, err)

    images, used, notes = [], [], {}
    for path in files:
        try:
            pixels, file_notes = load_image(path, resolution)
        except UnreadableImageError as err:
            log.warning("%s: skipping %s: %s", node, path, err)
            continue
        except ImageDecodeError as err:
            raise NodeInputError(node, f"in the folder '{name}': {err}") from err
        images.append(pixels)
        used.append(os.path.basename(path))
        if file_notes:
            notes[used[-1]] = "; ".join(file_notes)
    for file_name, text in notes.items():
        log.info("%s: %s decoded: %s", node, file_name, text)
    if not images:
        raise NodeInputError(node, f"none of the {len(files)} files in '{name}' could be read as an image. "
                                   "Replace them with PNG, JPG or WebP files.")
    stacked = torch.stack(images, 0)
    latents = encode_batches(vae, stacked.split(batch_size), stacked.shape[0])
    nset = NegationSet(latents, {"name": name, "source": "images", "images": len(used),
                                 "encode_resolution": resolution, "vae": vae_fingerprint(vae)[:16],
                                 "skipped": len(files) - len(used), "decode_notes": json.dumps(notes) if notes else None})
    try:
        atomic_save({"latents": nset.latents}, set_metadata(nset) | {"files": json.dumps(used)}, cache_path)
    except OSError as err:
        log.warning("%s: could not write the cache %s (%s); the set is kept in memory only", node, cache_path, err)
    return nset
