"""Modification texts from the reference caption R and the target caption T, by templates.

The method's three templates are ``"{target} instead of {reference}"``, ``"Unlike {reference}, I want
{target}"`` and ``"{target}"``. Presets: ``"cirr"`` (the first two), ``"fashioniq"`` (``"{target}"`` only) and
``"all"``. Any other template may use ``{reference}`` and ``{target}`` (``{{`` / ``}}`` for literal braces;
other placeholders are an error); braces inside a caption stay as they are. A generated triplet keeps every
candidate text; one is drawn per training step.
"""

from __future__ import annotations

import dataclasses
import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import check_positive_int
from ..errors import ConfigError, DataError, explain

__all__ = ["PRESETS", "FALLBACKS", "resolve_templates", "validate_template", "fill_template", "TextMaker",
           "word_count", "text_limit_of", "fit_generated_texts"]

logger = logging.getLogger(__name__)

INSTEAD = "{target} instead of {reference}"
UNLIKE = "Unlike {reference}, I want {target}"
TARGET = "{target}"
PRESETS: dict[str, tuple[str, ...]] = {"cirr": (INSTEAD, UNLIKE), "fashioniq": (TARGET,),
                                       "all": (INSTEAD, UNLIKE, TARGET)}
PLACEHOLDERS = ("reference", "target")
FALLBACKS = ("target", "truncate", "error")


def word_count(text: str) -> int:
    """The default token count: whitespace-separated words."""
    return len(text.split())


def validate_template(template: str) -> str:
    """Return ``template`` if it only uses {reference}/{target}; else raise ConfigError."""
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(explain("a template must be a non-empty string", got=template,
                                  fix="write e.g. '{target} instead of {reference}'"))
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(explain(f"the template is not a valid format string ({error})", got=template,
                                  fix="balance the braces; write {{ and }} for literal braces")) from None
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS or spec or conv:
            raise ConfigError(explain("the template uses an unknown placeholder", got=f"{{{name}}} in {template!r}",
                                      expected=[f"{{{p}}}" for p in PLACEHOLDERS],
                                      fix="use only {reference} and {target} (no format specs)"))
    if not fields:
        raise ConfigError(explain("the template has no placeholder, so its text would carry no modification",
                                  got=template, expected="at least one of {reference}, {target}"))
    return template


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name, one template string, or a sequence of templates (and/or preset names) -> templates."""
    if isinstance(templates, str):
        if templates in PRESETS:
            return PRESETS[templates]
        if "{" not in templates:
            raise ConfigError(explain("unknown template preset", got=templates, expected=sorted(PRESETS),
                                      fix="name a preset or give a template with {reference}/{target}"))
        return (validate_template(templates),)
    if not isinstance(templates, (list, tuple)) or not templates:
        raise ConfigError(explain("templates must be a preset name or a non-empty list of template strings",
                                  got=templates, expected=sorted(PRESETS)))
    return tuple(dict.fromkeys(template for item in templates for template in resolve_templates(item)))


def _check_caption(caption: Any, role: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(explain(f"the {role} caption is empty or not a string", got=caption,
                                fix="caption the image again or drop it"))
    return caption.strip()


def fill_template(template: str, reference: str, target: str) -> str:
    """Fill one validated template with the two (non-empty) captions."""
    validate_template(template)
    return template.format(reference=_check_caption(reference, "reference"), target=_check_caption(target, "target"))


def _counter(count_tokens: Any) -> Callable[[str], int]:
    if count_tokens is None:
        return word_count
    encode = getattr(count_tokens, "encode", None)
    if callable(encode):  # a tokenizer: its own token count, special tokens included
        return lambda text: len(encode(text))
    if callable(count_tokens):
        return count_tokens
    raise ConfigError(explain("count_tokens must be a callable text -> int or a tokenizer with .encode",
                              got=type(count_tokens).__name__))


@dataclass
class TextMaker:
    """Turn (reference caption, target caption) into the candidate texts of one triplet.

    Fields: ``templates`` (preset name or template strings, :func:`resolve_templates`); ``max_tokens`` (longest
    text in ``count_tokens`` units, None = no limit); ``count_tokens`` (callable text -> int, or a tokenizer:
    ``len(tokenizer.encode(text))``; default words); ``fallback`` for a text over ``max_tokens`` ("target": the
    target caption alone, cut to the limit if still too long; "truncate": drop trailing words until it fits;
    "error": DataError); ``rewrite`` (optional hook text -> text before the length check, as a
    :class:`~cir_plugins.positives.rewriters.TextHookRewriter`). ``maker(reference, target)`` is :meth:`fill`,
    the hook, then :meth:`finish`; the augmenter calls the two halves itself, a batched rewriter between them.
    """

    templates: Any = "cirr"
    max_tokens: int | None = None
    count_tokens: Any = None
    fallback: str = "target"
    rewrite: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        self.templates = resolve_templates(self.templates)
        check_positive_int("max_tokens", self.max_tokens, allow_none=True)
        if self.fallback not in FALLBACKS:
            raise ConfigError(explain("unknown fallback policy", got=self.fallback, expected=FALLBACKS))
        from .rewriters import TextHookRewriter

        self._hook = TextHookRewriter(self.rewrite) if self.rewrite is not None else None
        self._count = _counter(self.count_tokens)
        self.fallbacks_used = 0  # how many texts the length policy replaced or cut

    def _truncate(self, text: str) -> str:
        words = text.split()
        while len(words) > 1 and self._count(" ".join(words)) > self.max_tokens:
            words.pop()
        text = " ".join(words)
        while len(text) > 1 and self._count(text) > self.max_tokens:  # one word still too long: cut characters
            text = text[:-1]
        return text

    def fit(self, text: str, target: str) -> str:
        """``text`` if it fits ``max_tokens``, else what ``fallback`` makes of it (counted in ``fallbacks_used``)."""
        if self.max_tokens is None or (tokens := self._count(text)) <= self.max_tokens:
            return text
        if self.fallback == "error":
            raise DataError(explain("a generated text is longer than max_tokens", got=f"{tokens} tokens: {text[:80]!r}",
                                    expected=f"<= {self.max_tokens}",
                                    fix="raise max_tokens, shorten the captions, or use fallback='target'"))
        self.fallbacks_used += 1
        if self.fallbacks_used == 1:  # warn once per maker; the rest are counted in fallbacks_used
            logger.warning("a generated text is over max_tokens=%d (%d tokens); applying fallback=%r "
                           "(further cases are only counted)", self.max_tokens, tokens, self.fallback)
        if self.fallback == "truncate":
            return self._truncate(text)
        return target if self._count(target) <= self.max_tokens else self._truncate(target)

    def fill(self, reference: str, target: str) -> list[tuple[str, str]]:
        """``[(template, text), ...]``: every template filled with the two (non-empty) captions."""
        reference, target = _check_caption(reference, "reference"), _check_caption(target, "target")
        return [(template, template.format(reference=reference, target=target)) for template in self.templates]

    def finish(self, texts: list[tuple[str, str]], target: str) -> list[tuple[str, str]]:
        """Each ``(origin, text)`` through the length policy (:meth:`fit`); identical texts kept once."""
        target = _check_caption(target, "target")
        out: list[tuple[str, str]] = []
        for origin, text in texts:
            text = self.fit(text, target)
            if all(text != seen for _, seen in out):
                out.append((origin, text))
        return out

    def __call__(self, reference: str, target: str) -> list[tuple[str, str]]:
        """``[(template, text), ...]``: one per template, after the ``rewrite`` hook and the length policy."""
        filled = self.fill(reference, target)
        if self._hook is not None:
            filled = self._hook.rewrite_pairs([(reference, target)], [filled]).texts[0]
        return self.finish(filled, target)


def text_limit_of(model: Any) -> dict[str, Any]:
    """The length policy of a CIR model's text side: ``{"max_tokens": L, "count_tokens": f}``, or ``{}`` when the
    model says nothing about it; for the augmenter (``AugmentConfig(max_tokens=...)``,
    ``TripletAugmenter(count_tokens=...)``) or :func:`fit_generated_texts`.

    Read from, in order: ``model.max_text_tokens`` with ``model.count_text_tokens(text) -> int`` (declare these
    to be exact); else ``model.tokenizer`` with the limit in ``model.max_text_length``, ``model.max_length`` or
    ``tokenizer.model_max_length``, counted as ``len(tokenizer(text, truncation=False)["input_ids"])``, special
    tokens included. A wrapped model (``cp.wrap_model``) forwards these attributes."""
    limit, count = getattr(model, "max_text_tokens", None), getattr(model, "count_text_tokens", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 and callable(count):
        return {"max_tokens": limit, "count_tokens": count}
    tokenizer = getattr(model, "tokenizer", None)
    if not callable(tokenizer):
        return {}
    for value in (getattr(model, "max_text_length", None), getattr(model, "max_length", None),
                  getattr(tokenizer, "model_max_length", None)):
        # transformers writes a huge number when a tokenizer has no limit of its own
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
            def count_tokens(text: str) -> int:
                ids = tokenizer(text, truncation=False, verbose=False)["input_ids"]
                return int(ids.shape[-1]) if hasattr(ids, "shape") else len(ids)
            return {"max_tokens": int(value), "count_tokens": count_tokens}
    return {}


def fit_generated_texts(triplets: Sequence[Any], *, max_tokens: int, count_tokens: Any = None,
                        fallback: str = "target") -> tuple[list[Any], dict[str, int]]:
    """Generated triplets with every text over ``max_tokens`` handled by ``fallback`` (:class:`TextMaker`'s policy;
    "target" as the method's release). Annotated triplets pass unchanged. With "target", a generated triplet
    without ``meta["target_caption"]`` keeps its long texts (the model's tokenizer cuts them), counted in
    ``"no_caption"``. Returns the triplets and ``{"texts": generated texts checked, "fallbacks": texts replaced
    or cut, "no_caption": ...}``."""
    maker = TextMaker("all", max_tokens=max_tokens, count_tokens=count_tokens, fallback=fallback)
    out, checked, no_caption = [], 0, 0
    for triplet in triplets:
        if triplet.source != "generated":
            out.append(triplet)
            continue
        checked += len(triplet.texts)
        target = (triplet.meta or {}).get("target_caption")
        if not (isinstance(target, str) and target.strip()) and fallback == "target":
            no_caption += sum(maker._count(text) > max_tokens for text in triplet.texts)
            out.append(triplet)
            continue
        texts = tuple(text for _, text in maker.finish([("", t) for t in triplet.texts], target or triplet.texts[0]))
        out.append(triplet if texts == tuple(triplet.texts) else dataclasses.replace(triplet, texts=texts))
    return out, {"texts": checked, "fallbacks": maker.fallbacks_used, "no_caption": no_caption}
