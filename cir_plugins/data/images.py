"""Images on disk as a lazy ``Mapping[str, Tensor]`` (:class:`ImageStore`), plus the preprocessing CIR models use.

A store maps an image id (file name without extension) to a preprocessed float tensor ``(C, H, W)``, reading the file
only when asked. Paths stay under the store's root (``../``, absolute paths, a NUL, symlinks leading out:
:class:`~cir_plugins.errors.UnsafePathError`), checked when the store is made and again at every read. Every read
goes through :func:`open_image_file` (non-blocking, ``O_NOFOLLOW``, regular files only): a file swapped for a symlink
after the check, a FIFO, a socket, a device or a directory is an :class:`~cir_plugins.errors.ImageLoadError` at once,
never a hang, as is a path that cannot be resolved (a name over the filesystem's limit, a symlink loop).

The pixel limit (``max_pixels``, a decompression-bomb guard) bounds the source image from its header and, for the
named transforms, every image the transform makes on the way (pad canvas, resize before the crop: a 200000 x 1 PNG
of a few hundred bytes would ask for gigabytes), refused before anything is allocated; :meth:`ImageStore.readable_ids`
and the skip options drop such an image like any unreadable file.

Preprocessing (``transform=``) is a name with a size, or any callable ``PIL.Image (RGB) -> Tensor``:

- ``"clip"``: resize the shorter side to ``size`` (bicubic), centre-crop ``size x size``, scale to [0, 1], normalise
  with CLIP's mean / std.
- ``"targetpad"``: CLIP4Cir's padding: if the aspect ratio (long / short side) exceeds ``target_ratio`` (1.25), pad
  the shorter side with black, centred, until the ratio equals ``target_ratio``; then as ``"clip"``.
- ``"squarepad"``: pad the shorter side to a square, centred; then as ``"clip"``.
- ``"none"``: no resize, [0, 1] floats, no normalisation.

Every image is converted to RGB first: grayscale ("L", "1"), palette ("P", with or without transparency), "LA",
"RGBA" (alpha dropped, as PIL's ``convert("RGB")``), "CMYK", 16/32-bit integer images ("I;16", "I", scaled from their
full range to 8 bits) and float images ("F", assumed in [0, 1] if its max <= 1 else [0, 255]).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from ..checks import check_positive_int
from ..errors import ConfigError, DataError, ImageLoadError, ShapeError, UnsafePathError, explain

__all__ = ["pil_loader", "ImageStore", "CLIP_MEAN", "CLIP_STD", "TRANSFORM_NAMES", "DEFAULT_MAX_PIXELS",
           "make_transform", "to_rgb", "to_pil", "decode_image", "open_image_file", "image_format",
           "resolve_under_root", "ClipTransform", "preprocessing_differences"]

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORM_NAMES = ("clip", "targetpad", "squarepad", "none")
#: Default decompression-bomb limit (pixels). PIL's own default is ~89M; we state ours explicitly.
DEFAULT_MAX_PIXELS = 64_000_000
_FIX_FILE = "re-download or replace the file, or drop this id from the split"


def _resolved(path: Path, what: str) -> Path:
    """``path.resolve()``; a name over the filesystem's limit or a symlink loop is an ImageLoadError naming ``what``."""
    try:
        resolved = path.resolve()
        resolved.exists()  # a name over the limit passes resolve() but fails every stat: find out here
        return resolved
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop before Python 3.13
        raise ImageLoadError(explain(f"{what}: the path cannot be resolved (a name over the filesystem's limit or "
                                     "a symlink loop)", got=f"{path}: {error}",
                                     fix="shorten the file or folder name, or replace the looping symlink with the "
                                         "file")) from error


def resolve_under_root(root: Path, relative: str, *, what: str, parents: dict | None = None) -> Path:
    """Resolve ``relative`` (from an annotation file, "./train/34/x.png") under ``root`` (already resolved).

    UnsafePathError for an absolute path, a ``..`` component or a symlink resolving outside root; ImageLoadError
    for a path that cannot be resolved. ``what`` names the image in errors; ``parents`` caches resolved folders.
    """
    if not isinstance(relative, str) or not relative:
        raise UnsafePathError(explain(f"{what}: the image path is empty or not a string", got=relative,
                                      expected="a path relative to the dataset root", fix="fix the annotation file"))
    if "\x00" in relative:  # os calls would raise a bare ValueError
        raise UnsafePathError(explain(f"{what}: the image path holds a NUL character", got=repr(relative),
                                      expected="a path relative to the dataset root",
                                      fix="fix the annotation file (or the request)"))
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise UnsafePathError(explain(f"{what}: absolute image paths are not allowed", got=relative,
                                      expected=f"a path relative to {str(root)!r}",
                                      fix="make the path relative to the dataset root"))
    if ".." in relative.replace("\\", "/").split("/"):
        raise UnsafePathError(explain(f"{what}: the image path climbs out with '..'", got=relative,
                                      expected=f"a path inside {str(root)!r}",
                                      fix="remove the '..' components or move the image under the root"))
    candidate = root / relative
    if parents is None:
        resolved = _resolved(candidate, what)
    else:  # resolve each folder once (many images share one), then only the file itself
        if (folder := parents.get(candidate.parent)) is None:
            folder = parents[candidate.parent] = _resolved(candidate.parent, what)
        resolved = folder / candidate.name
        try:
            is_link = resolved.is_symlink()
        except OSError:  # e.g. a name over the filesystem's limit: let resolve() name the problem
            is_link = True
        if is_link:
            resolved = _resolved(resolved, what)
    root_text, resolved_text = str(root), str(resolved)
    if resolved_text != root_text and not resolved_text.startswith(root_text.rstrip(os.sep) + os.sep):
        raise UnsafePathError(explain(f"{what}: the image path resolves outside the dataset root "
                                      "(a symlink leading out)", got=f"{relative} -> {resolved}",
                                      expected=f"a file inside {str(root)!r}",
                                      fix="copy the image under the root instead of linking out"))
    return resolved


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image.convert("I") if mode != "I" else image, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255
        if mode == "I" and array.max(initial=0) > 65535:
            top = int(array.max())
        array = np.clip(array, 0, top) * (255.0 / top)
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale, 0, 255)
    else:
        return (image.convert("RGBA") if mode == "P" and "transparency" in image.info else image).convert("RGB")
    return Image.fromarray(np.round(array).astype(np.uint8), "L").convert("RGB")


def open_image_file(path: str | os.PathLike, *, what: str, fix: str = _FIX_FILE):
    """The package's one checked open (see the module doc): a binary file object of a regular, non-empty file, or
    ImageLoadError naming ``what`` and the cause."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageLoadError(explain(f"{what} is missing", got=str(path), expected="an existing image file",
                                     fix=fix)) from None
    except OSError as error:  # ELOOP: a symlink where the file was; EACCES, ENAMETOOLONG, ENXIO (a socket), ...
        raise ImageLoadError(explain(f"{what} cannot be opened", got=f"{path}: {error.strerror or error}",
                                     fix=fix)) from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                    else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or other special file")
            raise ImageLoadError(explain(f"{what} is not a regular file (it is {kind})", got=str(path),
                                         expected="an existing image file", fix=fix))
        if info.st_size == 0:
            raise ImageLoadError(explain(f"{what} is an empty (zero-byte) file", got=str(path), fix=fix))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _opened_image(source, what: str, formats: Sequence[str] | None, fix: str) -> Iterator[Image.Image]:
    """PIL's lazy open (header only) with :class:`OwnPixelLimit` on; any failure in the block is an ImageLoadError."""
    with OwnPixelLimit():
        try:
            with Image.open(source, formats=None if formats is None else list(formats)) as image:
                yield image
        except ImageLoadError:
            raise
        except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
            accepted = "" if formats is None else f" (accepted: {', '.join(formats)})"
            raise ImageLoadError(explain(f"{what} cannot be decoded: not a readable image{accepted} (corrupt, "
                                         "truncated or not an image format PIL reads)",
                                         got=f"{type(error).__name__}: {error}", fix=fix)) from error


def decode_image(source, *, what: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 check_size: Callable | None = None, fix: str = "replace the file",
                 limit_fix: str = "raise max_pixels if the file is trusted",
                 formats: Sequence[str] | None = None) -> Image.Image:
    """Decode ``source`` (a path or binary file object) into an RGB PIL image: the package's one image-open path.

    From the header, before any pixel is decoded: over ``max_pixels`` pixels, then ``check_size(w, h, max_pixels=...,
    what=...)`` when given (a named transform's bound). ``formats``: the PIL format names tried (e.g. ``("PNG",
    "JPEG")``; None: all). ImageLoadError naming ``what``, with ``limit_fix`` over the limit, else ``fix``.
    """
    with _opened_image(source, what, formats, fix) as image:
        w, h = image.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageLoadError(explain(f"{what} has more pixels than allowed by the pixel limit "
                                         "(decompression-bomb guard)", got=f"{w}x{h} = {w * h} pixels",
                                         expected=f"at most max_pixels={max_pixels}", fix=limit_fix))
        if callable(check_size):  # refused from the header, before the transform allocates anything
            check_size(w, h, max_pixels=max_pixels, what=what)
        image.load()
        return to_rgb(image).copy() if image.mode == "RGB" else to_rgb(image)


def image_format(source, *, what: str, formats: Sequence[str] | None = None, fix: str = "replace the file") -> str:
    """The PIL format name (``"PNG"``, ``"JPEG"``, ...) of ``source`` read from its header (nothing decoded);
    ImageLoadError naming ``what`` when PIL does not recognise it (among ``formats`` when given)."""
    with _opened_image(source, what, formats, fix) as image:
        if not image.format:
            raise ImageLoadError(explain(f"{what}: the image format is unknown", fix=fix))
        return str(image.format)


def pil_loader(images: Any, *, convert_tensors: bool = True) -> Callable[[str], Image.Image]:
    """id -> RGB PIL image, the package's one: an ImageStore's ``load_pil`` (exact pixels, checked open), a
    Mapping id -> PIL image or (C, H, W) tensor (tensors through :func:`to_pil`, or as they are with
    ``convert_tensors=False``: exact values for hashing), or a callable id -> image."""
    load_pil = getattr(images, "load_pil", None)
    if callable(load_pil):
        return load_pil
    if isinstance(images, Mapping):
        def load(image_id: str) -> Any:
            if image_id not in images:
                raise DataError(explain("no image for this id", got=image_id, fix="pass images covering every id"))
            value = images[image_id]
            if isinstance(value, torch.Tensor):
                return to_pil(value) if convert_tensors else value
            return value.convert("RGB") if hasattr(value, "convert") else value
        return load
    if callable(images):
        return images
    raise ConfigError(explain("cannot get PIL images from this object", got=type(images).__name__,
                              expected="an ImageStore, a Mapping id -> PIL/tensor, or a callable id -> PIL"))


def to_pil(image: Image.Image | torch.Tensor | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image (:func:`to_rgb`) or a (C, H, W) / (H, W, C) tensor or array, C in {1, 3}.

    A tensor's preprocessing (normalisation) is unknown here, so it is min-max scaled per image to [0, 255]:
    colours come back only approximately; an ImageStore's ``load_pil`` gives the exact pixels.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=float)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise DataError(explain("cannot turn this image into a PIL image", got=getattr(array, "shape", None),
                                expected="a PIL image or a (C, H, W) / (H, W, C) tensor or array with C in {1, 3}"))
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    array = np.round(array * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")


def _padded_size(w: int, h: int, target_ratio: float) -> tuple[int, int]:
    """(w, h) after padding the shorter side so that long/short <= target_ratio (unchanged if it already is)."""
    long_side, short_side = max(w, h), min(w, h)
    if short_side == 0 or long_side / short_side <= target_ratio:
        return w, h
    new_short = int(round(long_side / target_ratio))
    return (w, new_short) if w >= h else (new_short, h)


class OwnPixelLimit:
    """While any store is decoding, PIL's global bomb limit is off (each store checks its own
    ``max_pixels`` first, with our message) and truncated files are refused; the previous global
    settings come back when the last decoding thread leaves (reference-counted, thread-safe)."""

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple = ()

    def __enter__(self) -> None:
        with self._lock:
            if OwnPixelLimit._depth == 0:
                OwnPixelLimit._saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
            OwnPixelLimit._depth += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            OwnPixelLimit._depth -= 1
            if OwnPixelLimit._depth == 0:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = OwnPixelLimit._saved


class ClipTransform:
    """Picklable PIL (RGB) -> tensor (3, size, size) transform: ``kind`` in TRANSFORM_NAMES (module doc), ``size``
    the output side (ignored for "none"), ``target_ratio`` the largest aspect ratio "targetpad" keeps unpadded,
    ``mean`` / ``std`` the normalisation (CLIP's), ``max_pixels`` the largest image it makes on the way
    (:meth:`peak_pixels`; a bigger one is an ImageLoadError before anything is allocated; None: no bound)."""

    def __init__(self, kind: str = "clip", size: int = 224, *, target_ratio: float = 1.25,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if kind not in TRANSFORM_NAMES:
            raise ConfigError(explain("unknown transform name", got=kind, expected=TRANSFORM_NAMES,
                                      fix="pick one of the names or pass a callable PIL -> tensor"))
        check_positive_int("transform size", size, fix="e.g. size=224")
        if not (isinstance(target_ratio, (int, float)) and target_ratio >= 1.0):
            raise ConfigError(explain("target_ratio must be a number >= 1", got=target_ratio, fix="e.g. 1.25"))
        check_positive_int("max_pixels", max_pixels, allow_none=True)
        self.kind, self.size, self.target_ratio, self.max_pixels = kind, size, float(target_ratio), max_pixels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        self._mean_np = np.asarray(self.mean, dtype=np.float32)
        self._inv_std_np = (1.0 / np.asarray(self.std, dtype=np.float64)).astype(np.float32)

    def __repr__(self) -> str:
        return f"ClipTransform(kind={self.kind!r}, size={self.size}, target_ratio={self.target_ratio})"

    def description(self) -> dict:
        """Everything that changes the output tensor, JSON-ready (keys caches of preprocessed images)."""
        return {"transform": "ClipTransform", "kind": self.kind, "size": self.size if self.kind != "none" else None,
                "target_ratio": self.target_ratio if self.kind == "targetpad" else None,
                "mean": list(self.mean), "std": list(self.std)}

    def _sizes(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(size after padding, size after resizing) of a w x h image; the crop then takes size x size."""
        if self.kind == "none":
            return (w, h), (w, h)
        ratio = {"targetpad": self.target_ratio, "squarepad": 1.0}.get(self.kind)
        pw, ph = (w, h) if ratio is None else _padded_size(w, h, ratio)
        scale = self.size / max(min(pw, ph), 1)
        return (pw, ph), (max(self.size, int(round(pw * scale))), max(self.size, int(round(ph * scale))))

    def peak_pixels(self, w: int, h: int) -> int:
        """The most pixels any image made while transforming a w x h image holds (source, pad canvas, resize)."""
        (pw, ph), (rw, rh) = self._sizes(w, h)
        return max(w * h, pw * ph, rw * rh)

    def check_size(self, w: int, h: int, *, max_pixels: int | None = None, what: str = "the image") -> None:
        """ImageLoadError when transforming a w x h image would make one over ``max_pixels`` (default: the
        transform's own bound) pixels."""
        limit = self.max_pixels if max_pixels is None else max_pixels
        if limit is not None and (peak := self.peak_pixels(w, h)) > limit:
            raise ImageLoadError(explain(
                f"{what} would grow past the pixel limit inside the {self.kind!r} transform (pad or resize of a "
                "very thin image; decompression-bomb guard)",
                got=f"{w}x{h} -> {peak} pixels", expected=f"at most max_pixels={limit}",
                fix="drop the image (store.readable_ids / --skip-unreadable), crop it to a sane aspect ratio, or "
                    "raise max_pixels if you trust it"))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.check_size(*image.size)
        image = to_rgb(image)
        # numpy (single-threaded, no per-op thread-pool overhead): (H, W, 3) uint8 -> float32 in [0, 1]
        if self.kind == "none":
            array = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)
        w, h = image.size
        (pw, ph), (new_w, new_h) = self._sizes(w, h)
        if (pw, ph) != (w, h):  # pad the shorter side, black, centred
            canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
            canvas.paste(image, ((pw - w) // 2, (ph - h) // 2))
            image = canvas
        if (new_w, new_h) != (pw, ph):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
        array = (array - self._mean_np) * self._inv_std_np  # (H, W, 3), broadcast over the channel axis
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, size, size)


def make_transform(transform: str | Callable | None, size: int = 224, **kwargs) -> Callable:
    """Name ("clip", "targetpad", "squarepad", "none") + size, a callable, or None ("none")."""
    if transform is None:
        return ClipTransform("none", **kwargs)
    if isinstance(transform, str):
        return ClipTransform(transform, size, **kwargs)
    if callable(transform):
        return transform
    raise ConfigError(explain("transform must be a name or a callable PIL -> tensor", got=type(transform).__name__,
                              expected=TRANSFORM_NAMES, fix="pass e.g. transform='clip', size=224"))


def _check_on_error(mode: str) -> str:
    if mode not in ("error", "skip"):
        raise ConfigError(explain("on_error must be 'error' or 'skip'", got=mode, expected=("error", "skip")))
    return mode


def preprocessing_differences(here: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The keys in which two image preprocessing descriptions (:meth:`ImageStore.preprocessing`, or what a bank or
    a trained result recorded of it) differ, sorted; empty when the images are preprocessed the same way."""
    return sorted(k for k in {*here, *recorded} if here.get(k) != recorded.get(k))


class ImageStore(Mapping):
    """Lazy ``Mapping[str, Tensor]``: image id -> preprocessed float tensor ``(C, H, W)`` (module doc).

    Args:
        root: directory that every path is relative to (paths may not leave it).
        paths: image id -> path relative to root (e.g. ``{"dev-0-0-img0": "./dev/dev-0-0-img0.png"}``).
        transform: a name in TRANSFORM_NAMES (with ``size``, the output side) or a callable PIL (RGB) -> Tensor.
        max_pixels: decompression-bomb limit (ImageLoadError above it); None disables it (trusted data only).
        on_error: "error" (default) raises ImageLoadError for any unreadable image; "skip" makes :meth:`batch` /
            :meth:`readable_ids` drop (and log) unreadable ids. ``store[id]`` always raises.
        check_paths: resolve every path at construction (UnsafePathError early; cheap, on by default).
        source: the file the paths come from, named in errors.

    Picklable (DataLoader workers): it holds only paths and the transform.
    """

    def __init__(self, root: str | os.PathLike, paths: Mapping[str, str], transform: str | Callable | None = "clip",
                 *, size: int = 224, max_pixels: int | None = DEFAULT_MAX_PIXELS, on_error: str = "error",
                 check_paths: bool = True, source: str | None = None) -> None:
        self.root = _resolved(Path(root), "the image root")
        if not self.root.is_dir():
            raise ImageLoadError(explain("the image root is not a directory", got=str(root),
                                         fix="pass the dataset root that holds the images"))
        if not isinstance(paths, Mapping):
            raise ConfigError(explain("paths must be a mapping image id -> relative path", got=type(paths).__name__,
                                      fix="pass a dict"))
        _check_on_error(on_error)
        check_positive_int("max_pixels", max_pixels, allow_none=True)
        self._rel: dict[str, str] = {}
        self._abs: dict[str, Path] = {}
        where, parents = f" in {source}" if source else "", {}
        for image_id, rel in paths.items():
            if not isinstance(image_id, str) or not image_id:
                raise ConfigError(explain("image ids must be non-empty strings", got=image_id))
            self._rel[image_id] = rel
            if check_paths:
                self._abs[image_id] = resolve_under_root(self.root, rel, what=f"image {image_id!r}{where}",
                                                         parents=parents)
        self.check_paths, self.transform_spec, self.size, self.max_pixels = check_paths, transform, size, max_pixels
        self.transform = self._make_transform(transform, size)
        self.on_error = on_error

    def _make_transform(self, transform: str | Callable | None, size: int) -> Callable:
        """A named transform bounded by this store's max_pixels, or the callable as given."""
        if transform is None or isinstance(transform, str):
            return make_transform(transform, size, max_pixels=self.max_pixels)
        return make_transform(transform, size)

    def preprocessing(self) -> dict:
        """What the store's transform does to an image, JSON-ready: the named transform's description, or a
        callable's ``description()`` / ``repr`` (a callable without either is described by its class only, so
        give it a ``description()`` when it has settings that change its output)."""
        describe = getattr(self.transform, "description", None)
        if callable(describe):
            return dict(describe())
        text = repr(self.transform)
        if " at 0x" in text:  # the default repr names the object, not what it does
            text = f"{type(self.transform).__module__}.{type(self.transform).__qualname__}"
        return {"transform": text}

    def __len__(self) -> int:
        return len(self._rel)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rel)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rel

    def __getitem__(self, image_id: str) -> torch.Tensor:
        """The preprocessed tensor (C, H, W) of ``image_id``."""
        tensor = self.transform(self.load_pil(image_id))
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise ShapeError(explain(f"the transform returned something that is not a (C, H, W) tensor for "
                                     f"{image_id!r}", got=getattr(tensor, "shape", type(tensor).__name__),
                                     expected="(C, H, W) tensor", fix="make the transform return a 3-d float tensor"))
        return tensor

    def __repr__(self) -> str:
        return f"ImageStore(root={str(self.root)!r}, images={len(self)}, transform={self.transform!r})"

    @property
    def ids(self) -> list[str]:
        """Every image id, in the order given."""
        return list(self._rel)

    def path_of(self, image_id: str) -> Path:
        """Absolute path of ``image_id`` (checked to be under the root); KeyError for an id not in the store."""
        if image_id not in self._abs:
            self._abs[image_id] = resolve_under_root(self.root, self._rel[image_id], what=f"image {image_id!r}")
        return self._abs[image_id]

    def _open(self, relative: str, what: str) -> tuple[Path, object]:
        """(path, binary file object) of ``relative``, re-checked under the root now (it may have become a symlink
        leading out since the store was made)."""
        path = resolve_under_root(self.root, relative, what=what)
        return path, open_image_file(path, what=what)

    def _open_id(self, image_id: str) -> tuple[Path, object]:
        """:meth:`_open` of one of the store's ids (KeyError for another), its checked path remembered."""
        path, handle = self._open(self._rel[image_id], f"image {image_id!r}")
        self._abs[image_id] = path
        return path, handle

    def load_pil(self, image_id: str) -> Image.Image:
        """Open ``image_id`` as an RGB PIL image; ImageLoadError naming id, path and fix if it cannot."""
        path, handle = self._open_id(image_id)
        with handle:
            return decode_image(handle, what=f"image {image_id!r} at {path}", max_pixels=self.max_pixels,
                                check_size=getattr(self.transform, "check_size", None), fix=_FIX_FILE,
                                limit_fix="raise ImageStore(max_pixels=...) if the file is trusted")

    def load_relative(self, relative: str, *, what: str | None = None, max_pixels: int | None = None,
                      formats: Sequence[str] | None = None) -> Image.Image:
        """An RGB PIL image from a path relative to the root that need not be one of the store's ids, with the
        same checks as :meth:`load_pil` (root, symlinks, regular file, pixel limits: ``max_pixels``, default
        the store's, and the transform's bound); ``formats`` limits the PIL decoders tried."""
        what = what or f"image path {relative!r}"
        path, handle = self._open(relative, what)
        with handle:
            return decode_image(handle, what=what, max_pixels=self.max_pixels if max_pixels is None else max_pixels,
                                check_size=getattr(self.transform, "check_size", None), fix=_FIX_FILE,
                                limit_fix="use a smaller image", formats=formats)

    def read_file(self, image_id: str) -> tuple[bytes, str]:
        """The bytes of ``image_id``'s file as stored and its image format read from the header (PIL's name:
        ``"PNG"``, ``"JPEG"``, ...), never from the file name; same checks as :meth:`load_pil`. For serving the
        file as it is (the caller picks the content type from the format)."""
        _, handle = self._open_id(image_id)
        with handle:
            data = handle.read()
        return data, image_format(io.BytesIO(data), what=f"image {image_id!r}", fix=_FIX_FILE)

    def readable_ids(self, ids: Iterable[str] | None = None) -> list[str]:
        """The ids (all by default) whose image decodes; unreadable ones are logged and dropped."""
        kept = []
        for image_id in (self.ids if ids is None else ids):
            try:
                self.load_pil(image_id)
            except ImageLoadError as error:
                logger.warning("skipping unreadable image: %s", error)
                continue
            kept.append(image_id)
        return kept

    def batch(self, ids: Sequence[str], *, on_error: str | None = None) -> torch.Tensor | tuple[torch.Tensor, list]:
        """The tensors of ``ids`` stacked, ``(n, C, H, W)``; with ``on_error="skip"`` (argument or the store's
        setting) unreadable images are dropped and the result is ``(tensor (m, C, H, W), kept_ids)``."""
        mode = _check_on_error(self.on_error if on_error is None else on_error)
        tensors, kept = [], []
        for image_id in ids:
            try:
                tensors.append(self[image_id])  # KeyError for an id not in the store
            except ImageLoadError as error:
                if mode == "error":
                    raise
                logger.warning("skipping unreadable image: %s", error)
                continue
            kept.append(image_id)
        stacked = torch.stack(tensors) if tensors else torch.empty(0)
        return (stacked, kept) if mode == "skip" else stacked

    def with_transform(self, transform: str | Callable | None, *, size: int | None = None) -> ImageStore:
        """A copy of this store with another transform (paths are not re-checked)."""
        clone = object.__new__(ImageStore)
        clone.__dict__.update(self.__dict__)
        clone._rel, clone._abs, clone.transform_spec = dict(self._rel), dict(self._abs), transform
        clone.size = self.size if size is None else size
        clone.transform = clone._make_transform(transform, clone.size)
        return clone

    def subset(self, ids: Iterable[str]) -> ImageStore:
        """A store over only ``ids`` (same root and transform)."""
        clone = self.with_transform(self.transform_spec, size=self.size)
        clone.transform = self.transform
        wanted = list(ids)
        clone._rel = {i: self._rel[i] for i in wanted}  # KeyError for an id not in the store
        clone._abs = {i: self._abs[i] for i in wanted if i in self._abs}
        return clone
