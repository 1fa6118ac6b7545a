"""Load a user's model factory from a command-line spec (``file.py:function`` or ``pkg.mod:function``), or an
image encoder by its library's model name (``open_clip:...``, ``hf:...``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, explain

__all__ = ["load_factory", "ImageEncoder", "load_image_encoder", "IMAGE_ENCODER_PREFIXES"]

# the prefixes of an image encoder named by a library's own model name (not a factory spec)
IMAGE_ENCODER_PREFIXES = ("open_clip:", "hf:")
# the folders of factory files that _exec_file left on sys.path (at its end), newest first
_FACTORY_FOLDERS: list[str] = []


def _folder_of(module: Any) -> str | None:
    """The folder a top-level module was imported from (a package's parent folder), or None."""
    where = getattr(module, "__file__", None)
    if not isinstance(where, str):
        return None
    where = os.path.dirname(where)
    return os.path.dirname(where) if os.path.basename(module.__file__) == "__init__.py" else where


def _forget_if_stale(name: str) -> None:
    """Drop module ``name`` (and its submodules) when importing it now would find another file."""
    cached = sys.modules.get(name)
    loaded_from = getattr(cached, "__file__", None)
    if loaded_from is None:  # not loaded, or not from a file (built in, a namespace package)
        return
    finders = (getattr(finder, "find_spec", None) for finder in sys.meta_path)  # the import search, no cache
    found = next((spec for find in finders if callable(find) and (spec := find(name, None)) is not None), None)
    origin = getattr(found, "origin", None)
    if origin is None or os.path.realpath(origin) != os.path.realpath(loaded_from):
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def _import_module(where: str, spec: str) -> Any:
    """``where`` imported from the working directory first, not from earlier factory folders nor stale."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    hidden = [folder for folder in _FACTORY_FOLDERS if folder in sys.path and folder != cwd]
    for folder in hidden:
        sys.path.remove(folder)
    try:
        _forget_if_stale(where.split(".")[0])
        return importlib.import_module(where)
    except ModuleNotFoundError as error:
        if error.name is None or not (where == error.name or where.startswith(error.name + ".")):
            raise ConfigError(explain(f"importing the factory module {where!r} failed: its own import of "
                                      f"{error.name!r} is missing", got=spec,
                                      fix=f"install {error.name} (or fix the import in {where})")) from error
        raise ConfigError(explain(f"no module named {error.name!r} for the factory spec", got=spec,
                                  expected=f"{where.replace('.', '/')}.py (or a package) in the working directory "
                                           f"{cwd} or on sys.path",
                                  fix="run from the folder that holds it, or name the file: "
                                      f"path/to/{where.rsplit('.', 1)[-1]}.py:{spec.split(':')[-1]}")) from error
    except Exception as error:  # the module's own code raised on import
        raise ConfigError(explain(f"importing the factory module {where!r} raised {type(error).__name__}: {error}",
                                  got=spec, fix="fix the module (run with -v for the traceback)")) from error
    finally:
        if added:
            sys.path.remove(cwd)
        sys.path.extend(hidden)


def _exec_file(path: Path, spec: str) -> Any:
    """The file ``path`` executed as a fresh module, as ``python path`` would: its folder first on the path
    while it runs, then last (its factory's later imports find its siblings, which shadow no installed module);
    a same-named sibling an earlier factory file in another folder imported is not reused."""
    module_name = f"_cir_plugins_factory_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        for name, loaded in list(sys.modules.items()):  # modules an earlier factory folder gave this name
            if "." not in name and _folder_of(loaded) in _FACTORY_FOLDERS:
                _forget_if_stale(name)
        module_spec.loader.exec_module(module)
    except Exception as error:  # the file's own code raised
        sys.modules.pop(module_name, None)
        raise ConfigError(explain(f"running the factory file {path} raised {type(error).__name__}: {error}",
                                  got=spec, fix="fix the file (run with -v for the traceback)")) from error
    finally:
        sys.path.remove(folder)  # the copy inserted above (the file may have added its folder itself)
        if folder not in sys.path:
            sys.path.append(folder)
            _FACTORY_FOLDERS[:] = [folder, *(f for f in _FACTORY_FOLDERS if f != folder)]
    return module


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable (usually building a CIR model) named by ``spec``: ``path/to/file.py:name`` (the file run as a
    fresh module) or ``package.module:name`` (imported, the working directory first). Every failure (bad spec,
    missing file or module, the module raising on import, no such name) is one ConfigError naming spec and fix."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(explain("a factory spec must look like 'file.py:function' or 'pkg.module:function'",
                                  got=spec, fix="name the file or module, a colon, and the function"))
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(explain("the factory file does not exist", got=str(path),
                                      fix="give a path to an existing .py file"))
        module = _exec_file(path, spec)
    else:
        module = _import_module(where, spec)
    if not callable(getattr(module, name, None)):
        raise ConfigError(explain(f"{where} has no function {name!r}", got=spec,
                                  expected=sorted(n for n in dir(module) if not n.startswith("_"))[:20],
                                  fix="check the function's name"))
    return getattr(module, name)


class ImageEncoder:
    """A general image encoder for ranking partner images (:func:`load_image_encoder`; ``name``: its spec):
    ``encode_image(images (N, C, H, W)) -> (N, D)`` on images preprocessed by ``image_transform`` (PIL -> (C, H, W))."""

    def __init__(self, name: str, encode: Callable[[Any], Any], image_transform: Callable[[Any], Any],
                 device: Any) -> None:
        self.name, self._encode, self.image_transform, self.device = name, encode, image_transform, device

    def encode_image(self, images: Any) -> Any:
        import torch

        with torch.no_grad():
            return self._encode(images.to(self.device)).float()

    def __repr__(self) -> str:
        return f"ImageEncoder({self.name!r})"


def _features(output: Any) -> Any:
    """(N, D) features of a transformers output: itself, ``image_embeds`` / ``pooler_output``, else token 0."""
    if hasattr(output, "shape"):
        return output
    for key in ("image_embeds", "pooler_output"):
        if (value := getattr(output, key, None)) is not None:
            return value
    return output.last_hidden_state[:, 0]


def load_image_encoder(spec: str, *, device: Any = None, trust_remote_code: bool = False) -> ImageEncoder:
    """An image encoder by its library's model name, with that model's own preprocessing:
    ``open_clip:MODEL[:PRETRAINED]`` (e.g. ``open_clip:ViT-L-14:openai``; the ``open_clip`` extra) or
    ``hf:NAME_OR_PATH`` (a transformers vision model and its image processor: ``get_image_features`` as CLIP and
    SigLIP have, else the pooled output or first token, as ViT and DINOv2). It stands in for the release's Unicom
    ViT-L/14 (not on PyPI). Every failure is one ConfigError naming the spec and the fix."""
    import torch

    if not isinstance(spec, str) or not spec.startswith(IMAGE_ENCODER_PREFIXES) or not spec.split(":", 1)[1]:
        raise ConfigError(explain("an image encoder is named 'open_clip:MODEL[:PRETRAINED]' or 'hf:NAME_OR_PATH'",
                                  got=spec, fix="e.g. open_clip:ViT-L-14:openai or hf:openai/clip-vit-large-patch14"))
    device = torch.device(device or "cpu")
    kind, name = spec.split(":", 1)
    try:
        if kind == "open_clip":
            try:
                import open_clip
            except ImportError as error:
                raise ConfigError(explain("open_clip is not installed", got=spec,
                                          fix='pip install "cir-plugins[open_clip]"')) from error
            model_name, _, pretrained = name.partition(":")
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
            model = model.to(device).eval()
            return ImageEncoder(spec, model.encode_image, preprocess, device)
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        get_features = getattr(model, "get_image_features", None)
        forward = get_features if callable(get_features) else model

        def encode(pixels: Any) -> Any:
            return _features(forward(pixel_values=pixels))

        def transform(image: Any) -> Any:  # PIL -> (C, H, W), the model's own resize / crop / normalisation
            return processor(images=image, return_tensors="pt")["pixel_values"][0]

        return ImageEncoder(spec, encode, transform, device)
    except ConfigError:
        raise
    except Exception as error:  # a name the hub or open_clip does not know, a missing file, no network
        raise ConfigError(explain(f"loading the image encoder {spec!r} failed: {type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}", got=spec,
                                  fix="check the name (open_clip.list_pretrained(), or a Hub / local transformers "
                                      "vision model with an image processor)")) from error
