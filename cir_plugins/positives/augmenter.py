"""The triplet augmenter: de-duplicate, pair, caption, template -> generated triplets.

    augmenter = cp.TripletAugmenter(captioner, model, templates="cirr")   # near partners: rank window [0, 1%)
    result = augmenter.augment(split.gallery_ids, split.images, annotated=split.triplets)
    result.triplets, result.groups, result.summary      # an AugmentResult; iterating it gives the triplets

Steps (timed in ``result.summary["seconds"]``):
1. embed every image with the pair encoder (``pair_encoder.encode_image`` when it has one, else
   the callable itself), images (n, C, H, W) -> (n, D) or (n, T, D) (tokens are mean-pooled);
2. de-duplicate: decoded-pixel hash, plus embedding cosine >= ``near_duplicate_threshold``
   when set; each group is represented by its first id (input order) and only representatives
   are paired, so a group is one candidate row and never its own partner;
3. pair: for each query (every representative, or with ``refer_only`` the representatives of the
   annotated references) draw ``partners_per_image`` partners from the rank window;
4. caption the images that occur in a pair (cached, resumable), as PIL images from
   ``images.load_pil(id)`` when the mapping has it (an ImageStore), else converted back from the
   tensor with a per-image min-max scaling (approximate colours: prefer an ImageStore);
5. template: every triplet keeps all its candidate texts. A pair whose two captions are equal
   carries no modification: by default it is skipped and counted; ``keep_equal_captions=True`` keeps
   it, as the method's release does (with FashionIQ's ``"{target}"`` template its text is still a
   valid description of the target);
6. rewrite (with ``rewriter=``, e.g. :class:`~cir_plugins.positives.rewriters.LLMRewriter`): the
   template texts of all pairs go through the rewriter in batches (cached beside the captions); a
   pair the rewriter cannot serve keeps its template texts. The per-text ``rewrite=`` hook is run by
   the same step;
7. fit: a text longer than ``max_tokens`` (counted by ``count_tokens``; give the CIR model's with
   ``**text_limit_of(model)``) is replaced by the target caption alone (``fallback="target"``, as the
   release does), cut (``"truncate"``) or refused (``"error"``); ``summary["text_fallbacks"]`` counts
   them. ``max_triplets`` then subsamples (seeded), keeping output order.

The defaults are this library's recommended recipe, "ours, no rewrite": partners from the nearest 1%
of the pair encoder's ranking (``rank_window=(0.0, 0.01)``), one partner per image, the dataset's
templates, over-long texts replaced by the target caption. The paper's own settings per model and
dataset are the recipes (``cp.load_recipe(name).generation.augmenter_kwargs()``).
"""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..checks import check_positive_ints, require_images
from ..data.triplet import Triplet
from ..errors import ConfigError, DataError, ModelProtocolError, explain
from .captioners import cache_file_name, caption_images, check_captioner, pil_source
from .dedup import find_duplicates
from .pairing import _embed, parse_rank_window, select_partners
from .rewriters import as_rewriter
from .templates import TextMaker

__all__ = ["TripletAugmenter", "AugmentResult", "RECOMMENDED_RANK_WINDOW"]

# the recommended recipe's pairing: a partner among the nearest 1% of each image's ranking
RECOMMENDED_RANK_WINDOW = (0.0, 0.01)

logger = logging.getLogger(__name__)


def _encoder_of(pair_encoder: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    encode = getattr(pair_encoder, "encode_image", None)
    if callable(encode):
        return encode
    if callable(pair_encoder):
        return pair_encoder
    raise ModelProtocolError(explain("pair_encoder must be a callable images (n,C,H,W) -> (n,D) or have encode_image",
                                     got=type(pair_encoder).__name__, fix="pass your CIR model or a function"))


@dataclass
class AugmentResult:
    """What one :meth:`TripletAugmenter.augment` call produced.

    Attributes:
        triplets: the generated triplets (source="generated"), in output order.
        groups: image id -> duplicate-group id (the group's first id) over every input image.
        summary: counts (images, duplicates merged, pairs, captions new/cached, skips, triplets) and
            ``seconds`` per step.

    The result also reads as the list of its triplets (iteration, ``len``, indexing, ``list + result``),
    as ``augment`` returned a bare list before.
    """

    triplets: list[Triplet]
    groups: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Triplet]:
        return iter(self.triplets)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: Any) -> Any:
        return self.triplets[index]

    def __add__(self, other: Sequence[Triplet]) -> list[Triplet]:
        return self.triplets + list(other)

    def __radd__(self, other: Sequence[Triplet]) -> list[Triplet]:
        return list(other) + self.triplets

    def why_empty(self, window: Any) -> str:
        """Why no triplet came out, from the summary (for the error of a caller that needs triplets)."""
        s = self.summary
        if s["pairs"] == 0:
            return (f"the rank window {window} holds no partner for any of the {s['queries']} query images: each "
                    f"has {s['unique_images'] - 1} others to rank (ints are absolute ranks; floats are fractions "
                    "of N)")
        return (f"{s['pairs']} pairs were drawn with the rank window {window}, but every one was dropped "
                f"({s['skipped_same_caption']} with equal captions, {s['skipped_no_caption']} without a caption)")


class TripletAugmenter:
    """Generate (reference, texts, target) triplets from unlabelled training images.

    Args:
        captioner: callable (image_ids, PIL images) -> captions, with a ``name`` (see captioners.py).
        pair_encoder: a model with ``encode_image`` or a callable images (n, C, H, W) -> (n, D).
        templates: preset ("cirr", "fashioniq", "all") or template strings.
        rank_window: (a, b) ranks or fractions of N (see pairing.parse_rank_window); a < 0 = any.
            Default :data:`RECOMMENDED_RANK_WINDOW`, the nearest 1%.
        partners_per_image: partners drawn per query image.
        seed: seeds the partner draw and the ``max_triplets`` subsample.
        dedup: merge pixel-identical images before pairing.
        near_duplicate_threshold: also merge images whose pair-encoder cosine is >= this (None: off).
        refer_only: only references of the ``annotated`` triplets get partners ("refer").
        max_triplets: keep at most this many generated triplets (seeded subsample), None = all.
        cache_dir: folder for the caption cache (one JSONL file per captioner name) and the rewriter's
            answers (one per rewriter name); None = no cache.
        batch_size: images per pair-encoder call; caption_batch_size: images per captioner call
            (and per cache flush).
        max_tokens, count_tokens, fallback, rewrite: text length policy and per-text rewrite hook (TextMaker).
        rewriter: a batched rewriter (``rewrite_pairs(pairs, texts)``, e.g. ``cp.LLMRewriter``), or a
            callable text -> text; not together with ``rewrite``.
        keep_equal_captions: keep pairs whose two captions are equal (the release does); default False
            (skipped and counted in ``skipped_same_caption``).
        skip_empty: skip (and count) images whose caption is empty instead of raising.
        chunk_size: query rows per similarity block in pairing.
        show_progress: tqdm bars.
    """

    def __init__(
        self,
        captioner: Any,
        pair_encoder: Any,
        *,
        templates: Any = "cirr",
        rank_window: Any = RECOMMENDED_RANK_WINDOW,
        partners_per_image: int = 1,
        seed: int = 0,
        dedup: bool = True,
        near_duplicate_threshold: float | None = None,
        refer_only: bool = False,
        max_triplets: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        caption_batch_size: int = 16,
        max_tokens: int | None = None,
        count_tokens: Any = None,
        fallback: str = "target",
        rewrite: Callable[[str], str] | None = None,
        rewriter: Any = None,
        keep_equal_captions: bool = False,
        skip_empty: bool = False,
        chunk_size: int = 256,
        show_progress: bool = True,
    ) -> None:
        self.captioner = check_captioner(captioner)
        self.encoder = _encoder_of(pair_encoder)
        if rewrite is not None and rewriter is not None:
            raise ConfigError(explain("pass one of rewrite (a per-text hook) and rewriter", got="both",
                                      fix="drop rewrite=, or pass the hook as rewriter="))
        # the per-text hook runs as a rewriter, so one step rewrites whichever was given
        self.rewriter = as_rewriter(rewriter if rewriter is not None else rewrite)
        self.text_maker = TextMaker(templates, max_tokens=max_tokens, count_tokens=count_tokens, fallback=fallback)
        self.keep_equal_captions = bool(keep_equal_captions)
        self.rank_window = parse_rank_window(rank_window)
        check_positive_ints(partners_per_image=partners_per_image, batch_size=batch_size,
                            caption_batch_size=caption_batch_size, chunk_size=chunk_size)
        if max_triplets is not None and (isinstance(max_triplets, bool) or not isinstance(max_triplets, int)
                                         or max_triplets < 1):
            raise ConfigError(explain("max_triplets must be None or an int >= 1", got=max_triplets))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(explain("seed must be an int >= 0", got=seed))
        self.partners_per_image, self.seed, self.dedup = partners_per_image, seed, bool(dedup)
        self.near_duplicate_threshold, self.refer_only, self.max_triplets = near_duplicate_threshold, refer_only, max_triplets
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size, self.caption_batch_size, self.chunk_size = batch_size, caption_batch_size, chunk_size
        self.skip_empty, self.show_progress = skip_empty, show_progress
        self._last: AugmentResult | None = None  # only for the deprecated last_summary / last_groups

    @property
    def last_summary(self) -> dict[str, Any]:
        """Deprecated: the summary of the last ``augment`` call; use the returned ``AugmentResult.summary``."""
        warnings.warn("TripletAugmenter.last_summary is deprecated: use the summary of the AugmentResult that "
                      "augment() returns", DeprecationWarning, stacklevel=2)
        return self._last.summary if self._last is not None else {}

    @property
    def last_groups(self) -> dict[str, str]:
        """Deprecated: the duplicate groups of the last ``augment`` call; use ``AugmentResult.groups``."""
        warnings.warn("TripletAugmenter.last_groups is deprecated: use the groups of the AugmentResult that "
                      "augment() returns", DeprecationWarning, stacklevel=2)
        return self._last.groups if self._last is not None else {}

    @property
    def cache_path(self) -> Path | None:
        """The caption cache file for this captioner (None without ``cache_dir``)."""
        return self.cache_dir / cache_file_name(self.captioner.name) if self.cache_dir is not None else None

    @property
    def rewrite_cache_path(self) -> Path | None:
        """The rewriter's answer cache (None without ``cache_dir`` or rewriter)."""
        if self.cache_dir is None or self.rewriter is None:
            return None
        return self.cache_dir / cache_file_name(self.rewriter.name, kind="rewrites")

    def augment(
        self,
        image_ids: Sequence[str],
        images: Mapping[str, torch.Tensor],
        annotated: Sequence[Triplet] | None = None,
        *,
        groups: Mapping[str, Any] | None = None,
    ) -> AugmentResult:
        """Generated triplets for ``image_ids`` (source="generated"), with the duplicate groups and a summary.

        Args:
            image_ids: the training images (all of them, not only annotated references), unique.
            images: id -> (C, H, W) tensor (an ImageStore or any Mapping).
            annotated: the annotated triplets; needed with ``refer_only``.
            groups: optional id -> label; partners must share the query's label (FashionIQ
                category), ranks counted within the label.

        Returns an :class:`AugmentResult` (``.triplets``, ``.groups``, ``.summary``). Each triplet's
        ``meta``: reference_caption, target_caption, templates (one per text: the template it was filled
        from, or ``"rewrite:<rewriter name>"``), rank_window, seed, captioner, and rewriter when one ran.
        """
        timings: dict[str, float] = {}
        ids = list(image_ids)
        if not ids:
            raise DataError(explain("no image ids to augment", got=0, fix="pass the training split's image ids"))
        if len(set(ids)) != len(ids):
            raise DataError(explain("image_ids contain repeats", fix="pass each id once"))
        require_images(images, ids)
        if self.refer_only and annotated is None:
            raise ConfigError(explain("refer_only needs the annotated triplets", fix="pass annotated=split.triplets"))
        if groups is not None:
            lacking = [i for i in ids if i not in groups]
            if lacking:
                raise DataError(explain("groups has no label for some image ids", got=lacking[:5]))

        clock = time.perf_counter()
        embeddings = _embed(self.encoder, ids, images, batch_size=self.batch_size,
                            show_progress=self.show_progress)  # (N, D) float32, tokens pooled
        timings["embed"] = time.perf_counter() - clock

        clock = time.perf_counter()
        load = pil_source(images)
        if self.dedup:
            dup = find_duplicates(ids, load, embeddings=embeddings, near_duplicate_threshold=self.near_duplicate_threshold,
                                  show_progress=self.show_progress)
        else:
            dup = {i: i for i in ids}
        timings["dedup"] = time.perf_counter() - clock
        reps = [i for i in ids if dup[i] == i]
        row_of = {i: r for r, i in enumerate(ids)}
        sizes: dict[str, int] = {}
        for gid in dup.values():
            sizes[gid] = sizes.get(gid, 0) + 1

        if self.refer_only:
            refs = {t.reference for t in annotated}
            unknown = sorted(refs - set(ids))
            if unknown:
                logger.info("refer_only: %d annotated references are not among image_ids (ignored)", len(unknown))
            wanted = {dup[r] for r in refs if r in dup}
            queries = [r for r in reps if r in wanted]
        else:
            queries = reps
        rep_row = {i: k for k, i in enumerate(reps)}

        clock = time.perf_counter()
        picks = select_partners(
            embeddings[[row_of[i] for i in reps]], rank_window=self.rank_window,
            partners_per_image=self.partners_per_image, seed=self.seed,
            groups=[groups[i] for i in reps] if groups is not None else None,
            query_rows=[rep_row[q] for q in queries], chunk_size=self.chunk_size, show_progress=self.show_progress)
        pairs = [(q, reps[p]) for q, row in zip(queries, picks) for p in row]
        timings["pair"] = time.perf_counter() - clock

        clock = time.perf_counter()
        needed = list(dict.fromkeys(i for pair in pairs for i in pair))
        run = caption_images(self.captioner, needed, load, cache_path=self.cache_path,
                             batch_size=self.caption_batch_size, skip_empty=self.skip_empty,
                             show_progress=self.show_progress)
        timings["caption"] = time.perf_counter() - clock

        clock = time.perf_counter()
        self.text_maker.fallbacks_used = 0
        kept: list[tuple[str, str, str, str]] = []  # (reference, target, reference caption, target caption)
        same_caption = kept_same = no_caption = 0
        window = (self.rank_window.start, self.rank_window.stop) if not self.rank_window.is_any else (-1, -1)
        for reference, target in pairs:
            r_cap, t_cap = run.captions.get(reference), run.captions.get(target)
            if r_cap is None or t_cap is None:
                no_caption += 1
                continue
            if " ".join(r_cap.split()).lower() == " ".join(t_cap.split()).lower():
                if not self.keep_equal_captions:
                    same_caption += 1  # the text would carry no modification
                    continue
                kept_same += 1
            kept.append((reference, target, r_cap, t_cap))
        filled = [self.text_maker.fill(r_cap, t_cap) for _, _, r_cap, t_cap in kept]
        timings["template"] = time.perf_counter() - clock

        rewrite_summary = None
        if self.rewriter is not None:
            clock = time.perf_counter()
            rewrite_run = self.rewriter.rewrite_pairs([(r_cap, t_cap) for _, _, r_cap, t_cap in kept], filled,
                                                      cache_path=self.rewrite_cache_path,
                                                      show_progress=self.show_progress)
            if len(rewrite_run.texts) != len(kept):
                raise ModelProtocolError(explain(f"rewriter {self.rewriter.name} returned the wrong number of pairs",
                                                 got=len(rewrite_run.texts), expected=len(kept)))
            filled, rewrite_summary = rewrite_run.texts, rewrite_run.summary(self.rewriter.name)
            timings["rewrite"] = time.perf_counter() - clock

        clock = time.perf_counter()
        triplets: list[Triplet] = []
        for (reference, target, r_cap, t_cap), candidates in zip(kept, filled):
            made = self.text_maker.finish(candidates, t_cap)
            meta = {"reference_caption": r_cap, "target_caption": t_cap,
                    "templates": [origin for origin, _ in made], "rank_window": list(window),
                    "seed": self.seed, "captioner": self.captioner.name}
            if self.rewriter is not None:
                meta["rewriter"] = self.rewriter.name
            triplets.append(Triplet(reference=reference, texts=tuple(text for _, text in made), target=target,
                                    source="generated", meta=meta))
        before_subsample = len(triplets)
        if self.max_triplets is not None and len(triplets) > self.max_triplets:
            keep = sorted(random.Random(self.seed).sample(range(len(triplets)), self.max_triplets))
            triplets = [triplets[k] for k in keep]
        timings["template"] += time.perf_counter() - clock  # filling and fitting; the rewrite is timed apart

        summary = {
            "images": len(ids),
            "unique_images": len(reps),
            "duplicate_groups": sum(1 for s in sizes.values() if s > 1),
            "duplicates_merged": len(ids) - len(reps),
            "queries": len(queries),
            "empty_windows": sum(1 for row in picks if not row),
            "pairs": len(pairs),
            "captions": {"needed": len(needed), "new": run.new, "cached": run.cached, "skipped": len(run.skipped),
                         "torn_cache_lines": run.torn_lines},
            "skipped_same_caption": same_caption,
            "kept_same_caption": kept_same,
            "skipped_no_caption": no_caption,
            "rewrite": rewrite_summary,
            # texts over max_tokens that the fallback policy replaced (by the target caption) or cut
            "text_fallbacks": self.text_maker.fallbacks_used,
            "text_limit": ({"max_tokens": self.text_maker.max_tokens, "fallback": self.text_maker.fallback}
                           if self.text_maker.max_tokens is not None else None),
            "triplets_before_subsample": before_subsample,
            "triplets": len(triplets),
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        }
        logger.info("augment: %d triplets from %d images (%d pairs)", len(triplets), len(ids), len(pairs))
        self._last = AugmentResult(triplets=triplets, groups=dict(dup), summary=summary)
        return self._last
