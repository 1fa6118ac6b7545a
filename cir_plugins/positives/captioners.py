"""Captioners (images -> captions) and the resumable caption cache.

A captioner is any callable ``captioner(image_ids: list[str], images: list[PIL.Image.Image]) -> list[str]`` with
a ``name: str`` (it keys the cache): :class:`HFCaptioner`, :class:`PrecomputedCaptioner`, the synthetic world's.

:func:`caption_images` runs one with a :class:`CaptionCache`: JSONL, one ``{"id", "caption", "captioner"}`` line
per caption, fsync'ed after every batch. A re-run skips cached ids; a killed run loses at most the batch in
flight; a torn last line is ignored, counted and cut off. One file holds one captioner's captions (another name
is a ConfigError); a PrecomputedCaptioner's name hashes its captions, so an edited file starts a fresh cache.
Processes sharing a cache hold an exclusive ``<cache>.lock`` (``fcntl.flock``, POSIX only) to read, cut or
append, so a torn line only comes from a dead writer. An empty cached caption is ignored (``empty_lines``) and
the image captioned again. Ranks captioning together each append to their :func:`rank_cache_path` file;
:func:`merge_rank_caches` folds those into the cache (after the ranks, or at the start of the next run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import fsync_dir
from .._console import progress_bar

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the cache is then not locked against other processes
    fcntl = None

from .._utils import shard_rows
from ..checks import check_positive_int, check_positive_ints, dtype_from_name
from ..data.images import pil_loader
from ..errors import AnnotationError, ConfigError, DataError, ModelProtocolError, explain

__all__ = ["HFCaptioner", "PrecomputedCaptioner", "CaptionCache", "CaptionRun", "caption_images",
           "check_captioner", "default_prompt", "clean_caption", "cache_file_name", "rank_cache_path",
           "merge_rank_caches", "resolve_dtype", "load_pretrained"]

logger = logging.getLogger(__name__)

FASHION_PROMPT = "please briefly describe the {category} in {k} words"
GENERAL_PROMPT = "please briefly describe the image in {k} words"
_QUOTES = " \t\r\n\"'`\u201c\u201d\u2018\u2019"


def default_prompt(domain: str = "general") -> str:
    """The method's prompt template for ``domain`` ("fashion" or "general")."""
    prompts = {"fashion": FASHION_PROMPT, "general": GENERAL_PROMPT}
    if domain not in prompts:
        raise ConfigError(explain("unknown caption domain", got=domain, expected=["fashion", "general"]))
    return prompts[domain]


def check_captioner(captioner: Any) -> Any:
    """Raise ModelProtocolError unless ``captioner`` is callable with a non-empty ``name``."""
    name = getattr(captioner, "name", None)
    if not callable(captioner) or not isinstance(name, str) or not name:
        raise ModelProtocolError(explain(
            "a captioner must be callable (image_ids, images) -> captions and have a non-empty str `name`",
            got=f"{type(captioner).__name__} (name={name!r})",
            fix="use HFCaptioner / PrecomputedCaptioner or give your callable a `name` attribute"))
    return captioner


def _strip_prefix(text: str, prefix: str) -> str:
    """``text`` without a leading copy of ``prefix``, comparing case-insensitively and ignoring whitespace."""
    chars = [re.escape(c) for c in prefix if not c.isspace()]
    match = re.match(r"\s*" + r"\s*".join(chars), text, re.IGNORECASE) if chars else None
    return text[match.end():] if match else text


def clean_caption(text: str, *prompts: str | None) -> str:
    """Strip whitespace/quotes and a leading copy of each prompt in turn (case and spacing ignored): models that
    echo their input start the decoded text with it (e.g. the chat-rendered text, then the plain prompt)."""
    text = text.strip(_QUOTES)
    for prompt in prompts:
        if prompt:
            text = _strip_prefix(text, prompt).strip(_QUOTES)
    return text.strip(_QUOTES + ":.,;-").strip(_QUOTES)


def resolve_dtype(dtype: Any) -> Any:
    """A dtype name ("float32", "fp16", "bfloat16", ...), a torch dtype, "auto" or None -> what from_pretrained
    takes."""
    if dtype is None or dtype == "auto":
        return dtype
    return dtype_from_name(dtype, allowed=(torch.float32, torch.float16, torch.bfloat16))


def _image_text_model_class() -> Any:
    """The transformers auto class for image-to-text generation that this install has."""
    import transformers

    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
    if cls := next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None):
        return cls
    raise ConfigError(explain("this transformers install has no image-to-text auto class",
                              got=transformers.__version__, fix="upgrade transformers",
                              expected="AutoModelForImageTextToText or AutoModelForVision2Seq"))


def load_pretrained(model: Any, companion: Any, *, model_class: str | Callable[[], Any], companion_class: str,
                    companion_name: str, dtype: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """(model, companion, source) from ``model`` a hub name or local path (``from_pretrained`` of the auto classes
    ``model_class`` (a name or a function returning the class) and ``companion_class``, the companion only when
    not given), or a loaded model with its ``companion`` (cast to a ``dtype`` other than "auto"). ``source``: the
    name or path, or the loaded model's class name."""
    if isinstance(model, (str, os.PathLike)):
        import transformers

        source = str(model)
        trust = {"trust_remote_code": trust_remote_code}
        if not companion:
            companion = getattr(transformers, companion_class).from_pretrained(source, **trust)
        load_kwargs = {**trust, **({"dtype": resolve_dtype(dtype)} if dtype is not None else {})}
        loader = getattr(transformers, model_class) if isinstance(model_class, str) else model_class()
        return loader.from_pretrained(source, **load_kwargs), companion, source
    if companion is None:
        raise ConfigError(explain(f"a loaded model needs its {companion_name}", fix=f"pass {companion_name}=..."))
    source = type(model).__name__
    if dtype is not None and dtype != "auto":
        model = model.to(resolve_dtype(dtype))
    return model, companion, source


class HFCaptioner:
    """Caption images with a transformers image-to-text model (LLaVA, BLIP / BLIP-2, Qwen2-VL, ...).

    Args:
        model: hub name or local path (``AutoProcessor`` + ``AutoModelForImageTextToText``), or a loaded model
            (then pass ``processor``).
        domain: "general" or "fashion" (the default prompt); prompt: a template with optional ``{category}`` and
            ``{k}`` (k: its word count); category: one for every image, or a Mapping id -> category.
        device, dtype: where and in which dtype to run ("float16", "bfloat16", torch dtypes, "auto").
        max_new_tokens: generation length; greedy (``do_sample=False``, one beam) unless ``generate_kwargs``.
        batch_size: images per ``generate`` call (same prompt); use_chat_template: None = when the processor has one.
        skip_empty: an empty caption is a DataError naming the id (False) or "" counted in ``skipped`` (True).
        trust_remote_code: passed to ``from_pretrained``; off by default.

    Attributes: ``name`` "hf:<model>:<hash of prompt and decoding settings>" (keys the caption cache);
    ``generate_calls``, ``images_captioned``, ``skipped``. Shapes: ``pixel_values`` (n, C, H, W) as the
    processor makes them; generated ids (n, L).
    """

    def __init__(self, model: Any, *, processor: Any = None, domain: str = "general", prompt: str | None = None,
                 k: int = 10, category: str | Mapping[str, str] | None = None, device: str | torch.device = "cpu",
                 dtype: Any = None, max_new_tokens: int = 30, batch_size: int = 8,
                 use_chat_template: bool | None = None, generate_kwargs: Mapping[str, Any] | None = None,
                 skip_empty: bool = False, trust_remote_code: bool = False) -> None:
        self.prompt_template = prompt if prompt is not None else default_prompt(domain)
        if not isinstance(self.prompt_template, str) or not self.prompt_template.strip():
            raise ConfigError(explain("prompt must be a non-empty string", got=prompt))
        if domain == "fashion" and "{category}" in self.prompt_template and category is None:
            raise ConfigError(explain("the fashion prompt needs a category", got=None,
                                      fix="pass category='dress' or a mapping id -> category"))
        check_positive_ints(k=k, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.k, self.category, self.max_new_tokens, self.batch_size = k, category, max_new_tokens, batch_size
        self.device = torch.device(device)
        self.skip_empty = skip_empty
        self.generate_kwargs = {"do_sample": False, "num_beams": 1, **dict(generate_kwargs or {})}
        self.model, self.processor, source = load_pretrained(
            model, processor, model_class=_image_text_model_class, companion_class="AutoProcessor",
            companion_name="processor", dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = self.model.to(self.device).eval()
        self.use_chat_template = (getattr(self.processor, "chat_template", None) is not None
                                  if use_chat_template is None else bool(use_chat_template))
        settings = json.dumps([self.prompt_template, k, max_new_tokens, self.use_chat_template,
                               sorted((str(a), str(b)) for a, b in self.generate_kwargs.items())])
        self.name = f"hf:{source}:{hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()}"
        self.generate_calls = self.images_captioned = self.skipped = 0

    def prompt_for(self, image_id: str) -> str:
        """The plain prompt text for one image."""
        category = self.category
        if isinstance(category, Mapping):
            if image_id not in category:
                raise DataError(explain("no category for this image", got=image_id,
                                        fix="give every image id a category"))
            category = category[image_id]
        return self.prompt_template.format(category=category or "image", k=self.k)

    def _generate(self, prompt: str, images: list[Any]) -> list[str]:
        text = prompt
        if self.use_chat_template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = {key: (value.to(self.device) if isinstance(value, torch.Tensor) else value)
                  for key, value in inputs.items()}
        model_dtype = getattr(self.model, "dtype", None)
        if "pixel_values" in inputs and model_dtype is not None and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        self.generate_calls += 1
        sequences = output if isinstance(output, torch.Tensor) else output.sequences  # (n, L)
        prompt_ids = inputs.get("input_ids")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        captions = []
        for row, ids in enumerate(sequences):
            if (prompt_ids is not None and ids.shape[0] >= prompt_ids.shape[1]
                    and torch.equal(ids[:prompt_ids.shape[1]], prompt_ids[row])):
                ids = ids[prompt_ids.shape[1]:]  # decoder-only: keep only the new tokens
            decoded = tokenizer.decode(ids, skip_special_tokens=True)
            captions.append(clean_caption(decoded, *dict.fromkeys([text, prompt])))
        return captions

    def __call__(self, image_ids: list[str], images: list[Any]) -> list[str]:
        if len(image_ids) != len(images):
            raise DataError(explain("image_ids and images differ in length", got=(len(image_ids), len(images))))
        out: list[str | None] = [None] * len(image_ids)
        by_prompt: dict[str, list[int]] = {}
        for position, image_id in enumerate(image_ids):
            by_prompt.setdefault(self.prompt_for(image_id), []).append(position)
        for prompt, positions in by_prompt.items():  # one prompt per call: no prompt padding
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start:start + self.batch_size]
                rgb = [images[p].convert("RGB") for p in chunk]
                for p, caption in zip(chunk, self._generate(prompt, rgb)):
                    if not caption.strip():
                        if not self.skip_empty:
                            raise DataError(explain(f"{self.name} produced an empty caption for image {image_ids[p]!r}",
                                                    got=caption, fix="raise max_new_tokens, change the prompt, "
                                                    "or pass skip_empty=True to skip (and count) such images"))
                        self.skipped += 1
                    out[p] = caption
        self.images_captioned += len(image_ids)
        return [c or "" for c in out]


def _read_caption_file(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    captions: dict[str, str] = {}
    if text.lstrip().startswith("{") and not path.suffix == ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and not {"id", "caption"} <= set(data):
            for key, value in data.items():
                if not isinstance(value, str):
                    raise AnnotationError(explain(f"{path}: caption of {key!r} is not a string", got=value))
            return {str(key): value for key, value in data.items()}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnnotationError(explain(f"{path}:{number}: not a JSON line ({error.msg})", got=line[:80],
                                          expected='{"id": ..., "caption": ...}')) from None
        if not (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("id", "caption"))):
            raise AnnotationError(explain(f"{path}:{number}: a record needs string 'id' and 'caption'", got=line[:80]))
        captions[record["id"]] = record["caption"]
    return captions


class PrecomputedCaptioner:
    """Captions made elsewhere: a JSON object ``{id: caption}`` or JSONL ``{"id", "caption"}`` lines (a requested id
    missing from the file is a DataError naming it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(explain("the captions file does not exist", got=str(self.path),
                                      fix="give a JSON {id: caption} or JSONL file"))
        self.captions = _read_caption_file(self.path)
        content = json.dumps(sorted(self.captions.items()), ensure_ascii=False).encode()
        self.name = f"file:{self.path.name}:{hashlib.blake2b(content, digest_size=6).hexdigest()}"  # keys the cache

    def __call__(self, image_ids: list[str], images: list[Any]) -> list[str]:
        missing = [i for i in image_ids if i not in self.captions]
        if missing:
            raise DataError(explain(f"{self.path} has no caption for image {missing[0]!r}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                    got=missing[:5], fix="caption those images or drop them from the run"))
        return [self.captions[i] for i in image_ids]


def cache_file_name(captioner_name: str, kind: str = "captions") -> str:
    """A file name for one captioner's cache: ``kind`` ("captions"; the rewriters' "rewrites"), a readable slug
    and a short hash of the exact name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", captioner_name)[:60].strip("_") or "captioner"
    return f"{kind}-{slug}-{hashlib.blake2b(captioner_name.encode(), digest_size=4).hexdigest()}.jsonl"


class _CacheLock:
    """Exclusive ``fcntl.flock`` on ``<path>.lock`` while a cache is read, cut or appended (no-op without fcntl)."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path.with_name(path.name + ".lock"), None

    def __enter__(self) -> _CacheLock:
        if fcntl is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases its lock
            self.fd = None


class CaptionCache:
    """Append-only JSONL caption cache for one captioner (format and torn/empty lines: the module docstring).

    A malformed line before the last is an AnnotationError; another captioner's line a ConfigError. With
    ``keep_empty`` an empty value is a valid answer, returned like any other (the rewriters' cache: "the model
    said nothing" is what a deterministic model will say again).
    """

    def __init__(self, path: str | os.PathLike, captioner_name: str, *, keep_empty: bool = False) -> None:
        self.path = Path(path)
        self.captioner_name = captioner_name
        self.keep_empty = bool(keep_empty)
        self.captions: dict[str, str] = {}
        self.torn_lines = self.empty_lines = 0
        self._lock = _CacheLock(self.path)
        if self.path.exists():
            with self._lock:
                self._load()

    def _load(self) -> None:
        good_end = 0
        lines = self.path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            is_last = number == len(lines)
            if is_last and not raw:
                break  # file ends with a newline
            try:
                record = json.loads(raw.decode("utf-8"))
                valid = (isinstance(record, dict) and isinstance(record.get("id"), str)
                         and isinstance(record.get("caption"), str) and isinstance(record.get("captioner"), str))
            except (UnicodeDecodeError, json.JSONDecodeError):
                valid = False
            if is_last:  # no trailing newline: the write was cut short, even if it happens to parse
                self.torn_lines += 1
                logger.warning("caption cache %s: ignoring a torn last line (%d bytes)", self.path, len(raw))
                break
            if not valid:
                raise AnnotationError(explain(f"{self.path}:{number}: malformed caption cache line", got=raw[:80],
                                              expected='{"id", "caption", "captioner"}',
                                              fix="delete the line or the cache file"))
            if record["captioner"] != self.captioner_name:
                raise ConfigError(explain(f"{self.path} holds captions of another captioner",
                                          got=record["captioner"], expected=self.captioner_name,
                                          fix="use a separate cache file per captioner (see cache_file_name)"))
            good_end += len(raw) + 1
            if not record["caption"].strip() and not self.keep_empty:
                self.empty_lines += 1
                logger.warning("caption cache %s:%d: ignoring an empty caption of %r (it will be captioned again)",
                               self.path, number, record["id"])
                self.captions.pop(record["id"], None)
                continue
            self.captions[record["id"]] = record["caption"]
        if self.torn_lines:
            with open(self.path, "r+b") as handle:  # cut the torn tail so appends start on a fresh line
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.captions

    def __len__(self) -> int:
        return len(self.captions)

    def append(self, items: Sequence[tuple[str, str]]) -> None:
        """Append (id, caption) records as lines, then flush and fsync."""
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps({"id": i, "caption": c, "captioner": self.captioner_name}, ensure_ascii=False)
                          + "\n" for i, c in items)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.captions.update(items)


_RANK_SUFFIX = re.compile(r"\.rank(\d+)-of-(\d+)\.jsonl$")


def _stem(path: Path) -> str:
    return path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name


def rank_cache_path(cache_path: str | os.PathLike, rank: int, world: int) -> Path:
    """The file rank ``rank`` of ``world`` appends its captions to, beside ``cache_path``."""
    shard_rows(0, rank, world)  # ConfigError unless ints with 0 <= rank < world
    path = Path(cache_path)
    return path.with_name(f"{_stem(path)}.rank{rank}-of-{world}.jsonl")


def _rank_cache_files(cache_path: Path) -> list[Path]:
    """The rank files of ``cache_path`` that exist (any world size), by (world, rank)."""
    stem, found = _stem(cache_path), []
    for path in cache_path.parent.iterdir() if cache_path.parent.is_dir() else ():
        match = _RANK_SUFFIX.fullmatch(path.name[len(stem):] if path.name.startswith(stem) else "")
        if match and path.is_file():
            found.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(found)]


def merge_rank_caches(cache_path: str | os.PathLike, captioner_name: str) -> CaptionCache | None:
    """Fold the rank files of ``cache_path`` (any world size) into it, then delete them; None when there is none.

    Read in (world, rank) order and appended in one fsync'ed write, each id once; an id the cache holds keeps
    its caption, so a merge cut short by a kill is redone without repeats. The merged cache's ``torn_lines``
    also counts the torn lines cut from the rank files. One process merges, while no rank appends.
    """
    path = Path(cache_path)
    files = _rank_cache_files(path)
    if not files:
        return None
    cache, new = CaptionCache(path, captioner_name), {}
    for rank_file in files:
        part = CaptionCache(rank_file, captioner_name)
        cache.torn_lines += part.torn_lines
        new.update({i: c for i, c in part.captions.items() if i not in cache.captions and i not in new})
    cache.append(list(new.items()))
    for rank_file in files:
        rank_file.unlink()
        rank_file.with_name(rank_file.name + ".lock").unlink(missing_ok=True)
    fsync_dir(path.parent)
    logger.info("caption cache %s: merged %d captions from %d rank files", path, len(new), len(files))
    return cache


@dataclass
class CaptionRun:
    """What :func:`caption_images` did: captions by id, and counts (``empty_lines``: empty cached captions
    ignored, those images captioned again)."""

    captions: dict[str, str]
    cached: int = 0
    new: int = 0
    skipped: list[str] = field(default_factory=list)
    torn_lines: int = 0
    empty_lines: int = 0


def caption_images(captioner: Any, image_ids: Sequence[str], images: Any, *,
                   cache_path: str | os.PathLike | None = None, batch_size: int = 16, skip_empty: bool = False,
                   show_progress: bool = True) -> CaptionRun:
    """Caption ``image_ids`` with ``captioner`` (callable with ``name``), reusing and extending a cache.

    Args:
        images: an ImageStore (``load_pil``), a Mapping id -> PIL image or (C, H, W) tensor, or a callable
            id -> PIL image; loaded only for ids not yet cached.
        cache_path: JSONL cache (see :class:`CaptionCache`); None = no cache.
        skip_empty: an empty/whitespace caption is a DataError naming the id (False), or skipped, counted in
            ``skipped`` and not cached (True).
    """
    check_captioner(captioner)
    check_positive_int("batch_size", batch_size)
    ids = list(dict.fromkeys(image_ids))
    cache = CaptionCache(cache_path, captioner.name) if cache_path is not None else None
    known = cache.captions if cache is not None else {}
    todo = [i for i in ids if i not in known]
    run = CaptionRun(captions={}, cached=len(ids) - len(todo), torn_lines=cache.torn_lines if cache else 0,
                     empty_lines=cache.empty_lines if cache else 0)
    load = pil_loader(images)
    bar = progress_bar(total=len(todo), desc=f"captioning ({captioner.name})", unit="img", show_progress=show_progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        captions = captioner(batch, [load(i) for i in batch])
        if not isinstance(captions, (list, tuple)) or len(captions) != len(batch):
            got = len(captions) if isinstance(captions, (list, tuple)) else type(captions)
            raise ModelProtocolError(explain(f"captioner {captioner.name} returned the wrong number of captions",
                                             got=got, expected=len(batch)))
        keep = []
        for image_id, caption in zip(batch, captions):
            if not isinstance(caption, str) or not caption.strip():
                if not skip_empty:
                    raise DataError(explain(f"captioner {captioner.name} gave an empty caption for image {image_id!r}",
                                            got=caption, fix="fix the captioner or pass skip_empty=True"))
                run.skipped.append(image_id)
                continue
            keep.append((image_id, caption.strip()))
        if cache is not None:
            cache.append(keep)
        run.captions.update(keep)
        run.new += len(keep)
        bar.update(len(batch))
    bar.close()
    found = {**known, **run.captions}
    run.captions = {i: found[i] for i in ids if i in found}
    if run.skipped:
        logger.warning("captioning: skipped %d images with empty captions", len(run.skipped))
    return run
