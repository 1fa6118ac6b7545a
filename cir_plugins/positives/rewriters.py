"""Rewriters: turn the template texts of generated pairs into relative modification texts.

A template text names both captions ("a white cat on a bed instead of a black cat on a chair"); people search
with a relative request ("make the cat white and put it on a bed"). A rewriter takes a batch of captioned pairs
with their ``(template, text)`` candidates (:class:`~cir_plugins.positives.templates.TextMaker`'s):

    run = rewriter.rewrite_pairs(pairs, texts)   # pairs: [(reference caption, target caption)]
    run.texts                                    # per pair: [(origin, text), ...]

Each output text has its origin: its template, or ``"rewrite:<name>"`` for a model's text. The augmenter runs
this after captioning, before the text-length check. :class:`LLMRewriter`: a causal LM through its chat
template, prompted with a few annotated examples (reference caption, target caption, the human's text); greedy,
seeded, batched, cached (JSONL beside the captions, keyed by the rewriter's name and the two captions), with a
word limit; an unusable answer (:func:`unusable_reason`) leaves the pair its template texts, counted in
``run.fallback`` / ``run.reasons``. :class:`TextHookRewriter`: a per-text function ``text -> text`` (what
``TripletAugmenter(rewriter=callable)`` wraps; the synthetic world's ``SyntheticRewriter`` is one).

Models: any instruct model ``AutoModelForCausalLM`` loads whose tokenizer has a chat template, e.g.
``Qwen/Qwen2.5-0.5B-Instruct`` / ``-1.5B-Instruct``, ``HuggingFaceTB/SmolLM2-1.7B-Instruct``,
``meta-llama/Llama-3.2-1B-Instruct`` (gated) or ``microsoft/Phi-3.5-mini-instruct``. This project has not
measured how well any rewrites or what their texts add to training: read a sample of ``run.texts`` first and
compare with the template texts on a validation split. Examples: :data:`DEFAULT_EXAMPLES` (written for this
library, no dataset's annotations); better, a few of your own annotated triplets, :func:`examples_from_triplets`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._console import progress_bar
from ..checks import check_positive_int, check_positive_ints
from ..errors import ConfigError, DataError, ModelProtocolError, explain
from .captioners import CaptionCache, clean_caption, load_pretrained

__all__ = ["LLMRewriter", "TextHookRewriter", "RewriteRun", "Example", "DEFAULT_EXAMPLES", "PROMPT_VERSION",
           "examples_from_triplets", "as_rewriter", "rewriter_from_spec", "unusable_reason", "LONG_OUTPUT"]

logger = logging.getLogger(__name__)

# bump when the prompt's wording or layout changes: the version is part of the cache key
PROMPT_VERSION = "1"
# (reference caption, target caption, the text a person wrote)
Example = tuple[str, str, str]
# written for this library, in the short imperative style of relative captions
DEFAULT_EXAMPLES: tuple[Example, ...] = (
    ("a black cat sitting on a wooden chair", "a white cat asleep on a bed",
     "make the cat white and have it sleep on a bed"),
    ("three red apples in a glass bowl", "one green apple on a kitchen table",
     "keep only one apple, a green one, lying on the table"),
    ("a man riding a bicycle down a city street", "a woman walking a dog in a park",
     "a woman walking her dog in a park instead of the cyclist"),
    ("a blue short-sleeved shirt with a chest pocket", "a striped long-sleeved shirt",
     "has long sleeves and stripes and no pocket"),
)
SYSTEM_PROMPT = (
    "You write what a person types to turn a reference image into a target image when searching for it. "
    "You get a caption of each image. Answer with one short request, at most {max_words} words, that says "
    "what to change relative to the reference, in the style of the examples. Do not repeat the captions, "
    "do not explain, no quotes."
)
USER_PROMPT = "Reference: {reference}\nTarget: {target}"
# what an over-long model text becomes: the pair's template texts, or its first max_words words
LONG_OUTPUT = ("fallback", "cut")
_LABELS = re.compile(r"^\s*(?:reference|target|request|answer|text|modification)\s*:\s*", re.IGNORECASE)


def _norm(text: str) -> str:
    """Lower case, words only: how two texts are compared for "the same"."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def unusable_reason(text: str, reference: str, target: str, max_words: int) -> str | None:
    """Why a model's ``text`` cannot serve as the pair's modification text, or None when it can: "empty" (no letter
    or digit), "echo" (one or both captions repeated, words compared case-insensitively), "prompt" (it holds the
    prompt's "Reference:" / "Target:" labels), "too_long" (more than ``max_words`` words)."""
    words = _norm(text)
    if not words:
        return "empty"
    if words in (_norm(reference), _norm(target), _norm(f"{reference} {target}"), _norm(f"{target} {reference}")):
        return "echo"
    if re.search(r"\b(reference|target)\s*:", text, re.IGNORECASE):
        return "prompt"
    if len(text.split()) > max_words:
        return "too_long"
    return None


def _clean_output(text: str) -> str:
    """The first non-empty line of a model's answer, without quotes or a leading label such as "Answer:"."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return clean_caption(_LABELS.sub("", clean_caption(line)))


def _check_examples(examples: Any) -> tuple[Example, ...]:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ConfigError(explain("examples must be a non-empty list of (reference caption, target caption, text)",
                                  got=type(examples).__name__,
                                  fix="pass DEFAULT_EXAMPLES or examples_from_triplets(...)"))
    for index, example in enumerate(examples):
        if (not isinstance(example, (list, tuple)) or len(example) != 3
                or not all(isinstance(x, str) and x.strip() for x in example)):
            raise ConfigError(explain(f"example #{index} is not three non-empty strings", got=example,
                                      expected="(reference caption, target caption, human text)"))
    return tuple(tuple(x.strip() for x in example) for example in examples)


def examples_from_triplets(triplets: Sequence[Any], captions: Mapping[str, str], k: int = 4,
                           seed: int = 0) -> list[Example]:
    """``k`` in-context examples, drawn with ``seed`` among the annotated ``triplets`` (their first text is the
    human's) whose two images have ``captions`` (id -> caption, e.g. ``caption_images(...).captions``); a
    DataError when fewer than ``k`` have both."""
    check_positive_int("k", k)
    usable = [t for t in triplets if captions.get(t.reference, "").strip() and captions.get(t.target, "").strip()
              and t.texts and t.texts[0].strip()]
    if len(usable) < k:
        raise DataError(explain(f"only {len(usable)} annotated triplets have captions of both images", got=len(usable),
                                expected=f">= {k}", fix="caption more of the annotated triplets' images or lower k"))
    return [(captions[t.reference].strip(), captions[t.target].strip(), t.texts[0].strip())
            for t in random.Random(seed).sample(usable, k)]


@dataclass
class RewriteRun:
    """What one ``rewrite_pairs`` call did: ``texts`` (per pair, its ``(origin, text)`` candidates), ``rewritten``
    / ``fallback`` (pairs whose texts the rewriter wrote / that kept their template texts), ``reasons`` (fallback
    reason -> count: :func:`unusable_reason`, or "unchanged" for a hook that returned its text), ``cached`` /
    ``new`` (answers read from the cache / generated now), ``model_calls`` and ``torn_lines`` (cut from the cache).
    """

    texts: list[list[tuple[str, str]]]
    rewritten: int = 0
    fallback: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    cached: int = 0
    new: int = 0
    model_calls: int = 0
    torn_lines: int = 0

    def summary(self, name: str) -> dict[str, Any]:
        """The counts as a JSON-ready dict (the augment summary's ``rewrite`` entry)."""
        return {"rewriter": name, "rewritten": self.rewritten, "fallback": self.fallback,
                "reasons": dict(sorted(self.reasons.items())), "cached": self.cached, "new": self.new,
                "model_calls": self.model_calls, "torn_cache_lines": self.torn_lines}


def _check_inputs(pairs: Sequence[tuple[str, str]], texts: Sequence[Sequence[tuple[str, str]]]) -> None:
    if len(pairs) != len(texts):
        raise DataError(explain("pairs and texts differ in length", got=(len(pairs), len(texts)),
                                fix="pass one list of (template, text) candidates per pair"))


class TextHookRewriter:
    """A per-text function ``text -> text`` as a rewriter. The hook must return a non-empty string (a DataError
    otherwise); a pair is rewritten when any of its texts changed, else a fallback ("unchanged")."""

    def __init__(self, hook: Callable[[str], str]) -> None:
        if not callable(hook):
            raise ConfigError(explain("rewrite must be a callable text -> text", got=type(hook).__name__))
        self.hook = hook
        self.name = str(getattr(hook, "name", None) or getattr(hook, "__name__", None) or type(hook).__name__)

    def rewrite_text(self, text: str) -> str:
        """One text through the hook, checked."""
        rewritten = self.hook(text)
        if not isinstance(rewritten, str) or not rewritten.strip():
            raise DataError(explain("the rewrite hook returned an empty or non-string text", got=rewritten,
                                    fix="make the hook return the text it received or a rewrite"))
        return rewritten.strip()

    def rewrite_pairs(self, pairs: Sequence[tuple[str, str]], texts: Sequence[Sequence[tuple[str, str]]], *,
                      cache_path: str | os.PathLike | None = None, show_progress: bool | str = True) -> RewriteRun:
        """Every text through the hook (``cache_path`` is accepted and unused: a hook is not cached)."""
        _check_inputs(pairs, texts)
        run = RewriteRun(texts=[])
        for candidates in texts:
            out = [(origin, self.rewrite_text(text)) for origin, text in candidates]
            changed = any(new != old for (_, new), (_, old) in zip(out, candidates))
            run.rewritten += changed
            run.fallback += not changed
            if not changed:
                run.reasons["unchanged"] = run.reasons.get("unchanged", 0) + 1
            run.texts.append(out)
        return run


def rewriter_from_spec(spec: str, **kwargs: Any) -> LLMRewriter:
    """An :class:`LLMRewriter` (``kwargs``: device, batch_size, max_words, ...) from a spec:
    ``"hf:<hub name or local path>"``, or the path of a local model folder."""
    kind, _, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "hf" and rest.strip():
        return LLMRewriter(rest.strip(), **kwargs)
    if isinstance(spec, str) and spec.strip() and os.path.isdir(spec):
        return LLMRewriter(spec, **kwargs)
    raise ConfigError(explain("unknown rewriter spec", got=spec,
                              expected="hf:<hub name or local path> (a chat model), or a local model folder",
                              fix="e.g. hf:Qwen/Qwen2.5-1.5B-Instruct"))


def as_rewriter(rewriter: Any) -> Any:
    """A rewriter object (has ``rewrite_pairs`` and ``name``) as it is; a spec string through
    :func:`rewriter_from_spec`; a plain callable text -> text as a :class:`TextHookRewriter`; None stays None."""
    if rewriter is None:
        return None
    if isinstance(rewriter, str):
        return rewriter_from_spec(rewriter)
    if callable(getattr(rewriter, "rewrite_pairs", None)) and isinstance(getattr(rewriter, "name", None), str):
        return rewriter
    if callable(rewriter):
        return TextHookRewriter(rewriter)
    raise ConfigError(explain("a rewriter must have rewrite_pairs(pairs, texts) and a name, or be a callable "
                              "text -> text", got=type(rewriter).__name__,
                              fix="pass cp.LLMRewriter(...), a function text -> text, or None"))


class LLMRewriter:
    """Relative modification texts from a chat language model (transformers ``AutoModelForCausalLM``).

    Args:
        model: hub name or local path (``AutoModelForCausalLM`` + ``AutoTokenizer``), or a loaded model (then
            pass ``tokenizer``, one with a chat template).
        examples: in-context ``(reference caption, target caption, human text)``; default :data:`DEFAULT_EXAMPLES`.
        max_words, long_output: the word limit (in the prompt, checked on the answer); an answer over it: "fallback"
            (the pair keeps its template texts, default) or "cut" (its first ``max_words`` words).
        max_new_tokens: generation length; batch_size: pairs per ``generate`` call (prompts left-padded).
        device, dtype, seed: where and in which dtype it runs; torch is seeded around each ``generate`` call.
        system_message: the instructions in a system turn (True) or at the start of the first user turn (False:
            for chat templates without a system role).
        generate_kwargs, trust_remote_code: more ``generate`` arguments (default greedy); for ``from_pretrained``.

    The tokenizer pads on the left (pad token = EOS when it has none), so every prompt ends where generation
    starts. Attributes: ``name`` ``"hf-rewrite:<model>:<hash of prompt version, instructions, examples,
    settings>"`` keys the cache (a new prompt or new examples never reuse old answers); ``generate_calls``,
    ``pairs_generated``. Shapes: input ids (n, L) left-padded; generated ids (n, L + new).
    """

    def __init__(self, model: Any, *, tokenizer: Any = None, examples: Sequence[Example] | None = None,
                 max_words: int = 20, long_output: str = "fallback", max_new_tokens: int = 40, batch_size: int = 8,
                 device: str | torch.device = "cpu", dtype: Any = None, seed: int = 0, system_message: bool = True,
                 generate_kwargs: Mapping[str, Any] | None = None, trust_remote_code: bool = False) -> None:
        check_positive_ints(max_words=max_words, max_new_tokens=max_new_tokens, batch_size=batch_size)
        check_positive_int("seed", seed, minimum=0)
        if long_output not in LONG_OUTPUT:
            raise ConfigError(explain("unknown long_output policy", got=long_output, expected=LONG_OUTPUT))
        self.examples = _check_examples(DEFAULT_EXAMPLES if examples is None else examples)
        self.max_words, self.long_output, self.max_new_tokens = max_words, long_output, max_new_tokens
        self.batch_size, self.seed, self.system_message = batch_size, seed, bool(system_message)
        self.device = torch.device(device)
        self.generate_kwargs = {"do_sample": False, "num_beams": 1, **dict(generate_kwargs or {})}
        self.model, self.tokenizer, source = load_pretrained(
            model, tokenizer, model_class="AutoModelForCausalLM", companion_class="AutoTokenizer",
            companion_name="tokenizer", dtype=dtype, trust_remote_code=trust_remote_code)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ModelProtocolError(explain(f"the tokenizer of {source} has no chat template", got=source,
                                             fix="pick an instruct (chat) model, e.g. Qwen/Qwen2.5-0.5B-Instruct"))
        self.tokenizer.padding_side = "left"  # generation continues every prompt from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self.model.to(self.device).eval()
        self.source = source
        settings = json.dumps([PROMPT_VERSION, SYSTEM_PROMPT, USER_PROMPT, self.examples, max_words,
                               max_new_tokens, self.system_message,
                               sorted((str(a), str(b)) for a, b in self.generate_kwargs.items())])
        self.name = f"hf-rewrite:{source}:{hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()}"
        self.generate_calls = self.pairs_generated = 0

    def messages_for(self, reference: str, target: str) -> list[dict[str, str]]:
        """The chat: instructions, one user/assistant exchange per example, then the pair's question."""
        instructions = SYSTEM_PROMPT.format(max_words=self.max_words)
        turns: list[dict[str, str]] = []
        for r, t, text in self.examples:
            turns += [{"role": "user", "content": USER_PROMPT.format(reference=r, target=t)},
                      {"role": "assistant", "content": text}]
        turns.append({"role": "user", "content": USER_PROMPT.format(reference=reference, target=target)})
        if self.system_message:
            return [{"role": "system", "content": instructions}, *turns]
        turns[0] = {"role": "user", "content": f"{instructions}\n\n{turns[0]['content']}"}
        return turns

    def prompt_for(self, reference: str, target: str) -> str:
        """The chat rendered by the tokenizer's template, ending where the assistant's answer starts."""
        return self.tokenizer.apply_chat_template(self.messages_for(reference, target), add_generation_prompt=True,
                                                  tokenize=False)

    def _generate(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        prompts = [self.prompt_for(r, t) for r, t in pairs]
        # the template already holds the special tokens (BOS, turn markers): add none
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            output = self.model.generate(**batch, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id, **self.generate_kwargs)
        self.generate_calls += 1
        self.pairs_generated += len(pairs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences  # (n, L + new)
        new = sequences[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at column L
        return [_clean_output(self.tokenizer.decode(row, skip_special_tokens=True)) for row in new]

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """The model's cleaned answer for each (reference caption, target caption), in ``batch_size`` calls."""
        size = self.batch_size
        return [a for start in range(0, len(pairs), size) for a in self._generate(pairs[start:start + size])]

    def cache_key(self, reference: str, target: str) -> str:
        """The cache record id of one pair: a hash of this rewriter's name and the two captions."""
        payload = json.dumps([self.name, reference, target], ensure_ascii=False).encode()
        return hashlib.blake2b(payload, digest_size=16).hexdigest()

    def rewrite_pairs(self, pairs: Sequence[tuple[str, str]], texts: Sequence[Sequence[tuple[str, str]]], *,
                      cache_path: str | os.PathLike | None = None, show_progress: bool | str = True) -> RewriteRun:
        """One rewritten text per pair (``pairs``: (reference caption, target caption)), or its ``texts`` (its
        ``(template, text)`` candidates) when the answer is unusable; ``cache_path``: JSONL cache of the model's
        answers (the caption cache's format), None = none."""
        _check_inputs(pairs, texts)
        cache = CaptionCache(cache_path, self.name, keep_empty=True) if cache_path is not None else None
        known = cache.captions if cache is not None else {}
        keys = [self.cache_key(r, t) for r, t in pairs]
        todo = list(dict.fromkeys((k, pair) for k, pair in zip(keys, pairs) if k not in known))
        answers = dict(known)
        run = RewriteRun(texts=[], torn_lines=cache.torn_lines if cache is not None else 0)
        calls = self.generate_calls
        bar = progress_bar(total=len(todo), desc=f"rewriting ({self.source})", unit="pair", show_progress=show_progress)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            made = list(zip((k for k, _ in chunk), self._generate([pair for _, pair in chunk])))
            if cache is not None:
                cache.append(made)  # one flushed append per batch: a killed run loses at most this batch
            answers.update(made)
            bar.update(len(chunk))
        bar.close()
        run.model_calls, run.new, run.cached = self.generate_calls - calls, len(todo), len(set(keys)) - len(todo)
        origin = f"rewrite:{self.name}"
        for key, (reference, target), candidates in zip(keys, pairs, texts):
            answer = answers[key]
            reason = unusable_reason(answer, reference, target, self.max_words)
            if reason == "too_long" and self.long_output == "cut":
                answer, reason = " ".join(answer.split()[:self.max_words]), None
            if reason is None:
                run.rewritten += 1
                run.texts.append([(origin, answer)])
            else:
                run.fallback += 1
                run.reasons[reason] = run.reasons.get(reason, 0) + 1
                run.texts.append(list(candidates))
        if run.fallback:
            logger.info("rewriter %s: %d of %d pairs kept their template texts (%s)", self.name, run.fallback,
                        len(pairs), run.reasons)
        return run
