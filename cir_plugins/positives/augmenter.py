"""The triplet augmenter: de-duplicate, pair, caption, template -> generated triplets.

    config = cp.AugmentConfig(templates="cirr")                   # near partners: rank window [0, 1%)
    augmenter = cp.TripletAugmenter(captioner, model, config=config)
    result = augmenter.augment(split.gallery_ids, split.images, annotated=split.triplets)
    result.triplets, result.groups, result.summary      # an AugmentResult

Steps (timed in ``result.summary["seconds"]``): embed every image with the pair encoder (its ``encode_image``,
else the callable; (n, D) or (n, T, D) tokens mean-pooled); de-duplicate (pixel hash, plus cosine >=
``near_duplicate_threshold``; only each group's first id is paired, so a group is never its own partner); pair
(pairing.py: every representative, or with ``refer_only`` those of the annotated references, draws partners
from the rank window); caption the paired images (captioners.py; from ``images.load_pil(id)`` of an ImageStore,
else from the tensor min-max scaled per image: approximate colours); template (templates.py; a pair with two
equal captions carries no modification: skipped and counted unless ``keep_equal_captions``, the release's
behaviour); rewrite (``rewriter=``, rewriters.py; a pair it cannot serve keeps its template texts); fit (a text
over ``max_tokens`` gets the ``fallback``, counted in ``summary["text_fallbacks"]``); then the seeded
``max_triplets`` subsample, keeping output order.

The defaults are the recommended recipe, "ours, no rewrite" (nearest 1% of the pair encoder's ranking, one
partner per image, the dataset's templates, over-long texts -> the target caption); the paper's settings per
model and dataset: ``cp.load_recipe(name).generation``.

Across ranks (torchrun; ``augment(..., shard=(rank, world))`` on every rank with the same arguments): each rank
embeds its share of the images (on ``batch_size`` boundaries) and draws the partners of its share of the queries
(on ``chunk_size`` boundaries), both all-gathered; rank 0 de-duplicates and broadcasts the groups; the images
missing from the caption cache are split among the ranks, each captioning into its own rank file, which rank 0
merges into the cache; rank 0 alone then templates, rewrites and returns the one-process result (for a
deterministic encoder and captioner), other ranks return None. A killed run resumes with any number of ranks.
The ranks must share the cache folder.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._config import Config, document, option
from .._utils import shard_rows
from ..checks import check_positive_int, check_probability, require_images
from ..data.dedup import find_duplicates
from ..data.triplet import Triplet
from ..errors import ConfigError, DataError, ModelProtocolError, explain
from .captioners import (
    CaptionCache,
    cache_file_name,
    caption_images,
    check_captioner,
    merge_rank_caches,
    rank_cache_path,
)
from .pairing import pair_embeddings, parse_rank_window, select_partners
from .rewriters import as_rewriter
from .templates import FALLBACKS, TextMaker, resolve_templates

__all__ = ["TripletAugmenter", "AugmentConfig", "AugmentResult", "RankShare", "RECOMMENDED_RANK_WINDOW"]

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


@document
@dataclass
class AugmentConfig(Config):
    """What the augmenter generates: its settings as data (validated, JSON round-trip); a recipe's
    ``generation`` is one. The defaults are the recommended recipe, "ours, no rewrite"."""

    templates: Any = option("cirr", "a template preset (\"cirr\", \"fashioniq\", \"all\") or template strings")
    rank_window: Any = option(RECOMMENDED_RANK_WINDOW,
        "(a, b): partners drawn from ranks [a, b) of each image's ranking; ints are ranks, floats fractions of the "
        "images ranked; None (or a < 0) = any image")
    partners_per_image: int = option(1, "partners drawn per query image")
    seed: int = option(0, "seeds the partner draw and the max_triplets subsample")
    dedup: bool = option(True, "merge pixel-identical images before pairing (one group, one candidate)")
    near_duplicate_threshold: float | None = option(None,
        "also merge images whose pair-encoder cosine is at least this; None = off")
    refer_only: bool = option(False, "only the references of the annotated triplets get partners (\"refer\")")
    max_triplets: int | None = option(None, "keep at most this many generated triplets (seeded subsample); None = all")
    max_tokens: int | None = option(None,
        "longest text in the counter's units (the CIR model's: text_limit_of(model)); None = no limit")
    fallback: str = option("target",
        "a text over max_tokens: \"target\" (the target caption, as the release), \"truncate\" or \"error\"")
    keep_equal_captions: bool = option(False,
        "keep pairs whose two captions are equal (the release does); False = skip and count them")
    skip_empty: bool = option(False, "skip (and count) images whose caption is empty instead of raising")
    batch_size: int = option(64, "images per pair-encoder call")
    caption_batch_size: int = option(16, "images per captioner call (and per caption-cache flush)")
    chunk_size: int = option(256, "query rows per similarity block in pairing")

    def __post_init__(self) -> None:
        self.templates, self.rank_window = (tuple(v) if isinstance(v, list) else v
                                            for v in (self.templates, self.rank_window))
        resolve_templates(self.templates)  # ConfigError for an unknown preset or a bad template
        if self.rank_window is not None:
            parse_rank_window(self.rank_window)
        for name in ("partners_per_image", "batch_size", "caption_batch_size", "chunk_size", "max_triplets",
                     "max_tokens"):
            check_positive_int(f"AugmentConfig.{name}", getattr(self, name), allow_none=name.startswith("max_"))
        check_positive_int("AugmentConfig.seed", self.seed, minimum=0)
        if self.near_duplicate_threshold is not None:
            check_probability("AugmentConfig.near_duplicate_threshold", self.near_duplicate_threshold)
        if self.fallback not in FALLBACKS:
            raise ConfigError(explain("unknown AugmentConfig.fallback", got=self.fallback, expected=FALLBACKS))
        for name in ("dedup", "refer_only", "keep_equal_captions", "skip_empty"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(explain(f"AugmentConfig.{name} must be True or False", got=getattr(self, name)))

    @property
    def window(self):
        """The rank window as a :class:`~cir_plugins.positives.pairing.RankWindow` (None: any image)."""
        return parse_rank_window(self.rank_window if self.rank_window is not None else (-1, -1))


@dataclass
class AugmentResult:
    """What one :meth:`TripletAugmenter.augment` call produced: ``triplets`` (source="generated", in output
    order), ``groups`` (image id -> its duplicate group's first id, over every input image) and ``summary``
    (counts of images, duplicates merged, pairs, captions new/cached, skips, triplets; ``seconds`` per step)."""

    triplets: list[Triplet]
    groups: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

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
        config: an :class:`AugmentConfig` (default: the recommended recipe).
        rewriter: a batched rewriter (``rewrite_pairs``, e.g. ``cp.LLMRewriter``), a spec such as ``"hf:NAME"``,
            or a callable text -> text; None = the template texts.
        count_tokens: the unit of ``config.max_tokens``: a callable text -> int or a tokenizer (default: words).
        cache_dir: folder of the caption cache and the rewriter's answers (one JSONL file per captioner /
            rewriter name); None = no cache.
        show_progress: tqdm bars: True (on a terminal), "always" (also on a redirected stderr) or False; rank 0 only.
    """

    def __init__(self, captioner: Any, pair_encoder: Any, *, config: AugmentConfig | None = None, rewriter: Any = None,
                 count_tokens: Any = None, cache_dir: str | os.PathLike | None = None,
                 show_progress: bool | str = True) -> None:
        self.config = config if config is not None else AugmentConfig()
        if not isinstance(self.config, AugmentConfig):
            raise ConfigError(explain("config must be a cir_plugins.AugmentConfig", got=type(self.config).__name__,
                                      fix="TripletAugmenter(captioner, encoder, config=cp.AugmentConfig(...))"))
        self.captioner = check_captioner(captioner)
        self.encoder = _encoder_of(pair_encoder)
        self.rewriter = as_rewriter(rewriter)
        self.text_maker = TextMaker(self.config.templates, max_tokens=self.config.max_tokens,
                                    count_tokens=count_tokens, fallback=self.config.fallback)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.show_progress = show_progress

    def _progress(self, ranks: RankShare) -> bool | str:
        """The bars' setting on this rank: rank 0 shows them, the others stay quiet."""
        return self.show_progress if ranks.rank == 0 else False

    @property
    def cache_path(self) -> Path | None:
        """The caption cache file for this captioner (None without ``cache_dir``)."""
        return self.cache_dir / cache_file_name(self.captioner.name) if self.cache_dir is not None else None

    @property
    def rewrite_cache_path(self) -> Path | None:
        """The rewriter's answer cache (None without ``cache_dir`` or rewriter)."""
        if self.cache_dir is not None and self.rewriter is not None:
            return self.cache_dir / cache_file_name(self.rewriter.name, kind="rewrites")

    def augment(self, image_ids: Sequence[str], images: Mapping[str, torch.Tensor],
                annotated: Sequence[Triplet] | None = None, *, groups: Mapping[str, Any] | None = None,
                shard: tuple[int, int] | None = None) -> AugmentResult | None:
        """Generated triplets for ``image_ids`` (source="generated"), with the duplicate groups and a summary.

        Args:
            image_ids: the training images (all of them, not only annotated references), unique.
            images: id -> (C, H, W) tensor (an ImageStore or any Mapping).
            annotated: the annotated triplets; needed with ``refer_only``.
            groups: optional id -> label; partners share the query's label (FashionIQ category), ranks
                counted within it.
            shard: ``(rank, world)`` of an initialised process group (``distributed_rank()`` under torchrun;
                see the module doc): every rank calls with the same arguments and one ``cache_dir`` all ranks
                see. None or ``(0, 1)``: one process. The rewriter runs on rank 0 alone.

        Returns an :class:`AugmentResult`; None on a rank other than 0. Each triplet's ``meta``:
        reference_caption, target_caption, templates (per text: its template, or ``"rewrite:<rewriter
        name>"``), rank_window, seed, captioner, and rewriter when one ran.
        """
        ids = self._check(image_ids, images, annotated, groups)
        ranks = RankShare.of(shard)
        if ranks.world > 1 and self.cache_dir is None:
            raise ConfigError(explain("generation across ranks passes the captions through the cache folder",
                                      got="cache_dir=None", fix="pass cache_dir=, a folder every rank can read"))
        timings: dict[str, float] = {}

        @contextmanager
        def step(name: str):
            start = time.perf_counter()
            yield
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

        with step("embed"):
            embeddings = self._embed(ids, images, ranks)  # (N, D) float32, tokens pooled
        with step("dedup"):
            dup = self._dedup(ids, images, embeddings, ranks)
        with step("pair"):
            queries, pairs, empty = self._pair(ids, dup, embeddings, annotated, groups, ranks)
        with step("caption"):
            needed = list(dict.fromkeys(i for pair in pairs for i in pair))
            captions, caption_counts = self._caption(needed, images, ranks)
        if ranks.rank != 0:
            return None
        with step("template"):
            kept, dropped = self._keep(pairs, captions)
            filled = [self.text_maker.fill(r_cap, t_cap) for _, _, r_cap, t_cap in kept]
        rewrite_summary = None
        if self.rewriter is not None:
            with step("rewrite"):
                filled, rewrite_summary = self._rewrite(kept, filled)
        with step("template"):  # filling and fitting; the rewrite is timed apart
            triplets, before_subsample = self._triplets(kept, filled)
        reps, sizes, maker = sum(1 for i in ids if dup[i] == i), Counter(dup.values()), self.text_maker
        summary = {
            "images": len(ids), "unique_images": reps, "duplicate_groups": sum(1 for n in sizes.values() if n > 1),
            "duplicates_merged": len(ids) - reps, "queries": queries, "empty_windows": empty, "pairs": len(pairs),
            "captions": caption_counts, **dropped, "rewrite": rewrite_summary,
            # texts over max_tokens that the fallback policy replaced (by the target caption) or cut
            "text_fallbacks": maker.fallbacks_used,
            "text_limit": ({"max_tokens": maker.max_tokens, "fallback": maker.fallback}
                           if maker.max_tokens is not None else None),
            "triplets_before_subsample": before_subsample, "triplets": len(triplets), "ranks": ranks.world,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        }
        logger.info("augment: %d triplets from %d images (%d pairs)", len(triplets), len(ids), len(pairs))
        return AugmentResult(triplets=triplets, groups=dict(dup), summary=summary)

    def _check(self, image_ids, images, annotated, groups) -> list[str]:
        ids = list(image_ids)
        if not ids:
            raise DataError(explain("no image ids to augment", got=0, fix="pass the training split's image ids"))
        if len(set(ids)) != len(ids):
            raise DataError(explain("image_ids contain repeats", fix="pass each id once"))
        require_images(images, ids)
        if self.config.refer_only and annotated is None:
            raise ConfigError(explain("refer_only needs the annotated triplets", fix="pass annotated=split.triplets"))
        lacking = [i for i in ids if i not in groups] if groups is not None else []
        if lacking:
            raise DataError(explain("groups has no label for some image ids", got=lacking[:5]))
        return ids

    def _embed(self, ids, images, ranks: RankShare) -> torch.Tensor:
        """(N, D) float32 pair embeddings; across ranks each embeds its share of whole batches, all-gathered."""
        size = self.config.batch_size
        start, stop = ranks.span(len(ids), size)
        local = pair_embeddings(self.encoder, ids[start:stop], images, batch_size=size,
                                show_progress=self._progress(ranks)) if stop > start else None
        if ranks.world == 1:
            return local
        # rank 0 always holds the first batch: its width is the one every rank gathers
        width = int(ranks.broadcast(torch.tensor([local.shape[1] if ranks.rank == 0 else 0]))[0])
        if local is None:
            local = torch.empty(0, width)
        elif local.shape[1] != width:
            raise ModelProtocolError(explain(f"rank {ranks.rank}'s pair encoder gives another embedding width "
                                             "than rank 0's", got=local.shape[1], expected=width,
                                             fix="load the same pair encoder on every rank"))
        return ranks.gather(local, len(ids), size)

    def _dedup(self, ids, images, embeddings, ranks: RankShare) -> dict[str, str]:
        """id -> its duplicate group's first id (itself without dedup); across ranks rank 0's, broadcast."""
        if not self.config.dedup:
            return {i: i for i in ids}
        found = None
        if ranks.rank == 0:
            found = find_duplicates(ids, images, embeddings=embeddings,
                                    near_duplicate_threshold=self.config.near_duplicate_threshold,
                                    show_progress=self.show_progress)
        if ranks.world == 1:
            return found
        row_of = {i: r for r, i in enumerate(ids)}
        first = torch.tensor([row_of[found[i]] for i in ids] if found is not None else [0] * len(ids),
                             dtype=torch.int64)  # (N,) the row of each image's group id
        return {i: ids[r] for i, r in zip(ids, ranks.broadcast(first).tolist())}

    def _pair(self, ids, dup, embeddings, annotated, groups,
              ranks: RankShare) -> tuple[int, list[tuple[str, str]], int]:
        """(number of queries, (reference, target) pairs, queries with an empty window), over the groups'
        representatives; across ranks each draws its share of whole ``chunk_size`` blocks, all-gathered."""
        reps = [i for i in ids if dup[i] == i]
        queries = reps
        if self.config.refer_only:
            refs = {t.reference for t in annotated}
            unknown = sorted(refs - set(ids))
            if unknown:
                logger.info("refer_only: %d annotated references are not among image_ids (ignored)", len(unknown))
            wanted = {dup[r] for r in refs if r in dup}
            queries = [r for r in reps if r in wanted]
        row_of = {i: r for r, i in enumerate(ids)}
        rep_row = {i: k for k, i in enumerate(reps)}
        chunk = self.config.chunk_size
        start, stop = ranks.span(len(queries), chunk)
        picks = select_partners(
            embeddings[[row_of[i] for i in reps]], rank_window=self.config.window,
            partners_per_image=self.config.partners_per_image, seed=self.config.seed,
            groups=[groups[i] for i in reps] if groups is not None else None,
            query_rows=[rep_row[q] for q in queries[start:stop]], chunk_size=chunk,
            show_progress=self._progress(ranks))
        if ranks.world > 1:
            k = self.config.partners_per_image
            local = torch.full((len(picks), k), -1, dtype=torch.int64)  # (q_local, k), -1 = no partner
            for row, partners in enumerate(picks):
                local[row, :len(partners)] = torch.tensor(partners, dtype=torch.int64)
            picks = [[p for p in row if p >= 0] for row in ranks.gather(local, len(queries), chunk).tolist()]
        pairs = [(q, reps[p]) for q, row in zip(queries, picks) for p in row]
        return len(queries), pairs, sum(1 for row in picks if not row)

    def _caption(self, needed, images, ranks: RankShare) -> tuple[dict[str, str] | None, dict[str, int]]:
        """Captions of ``needed`` (id -> caption) and their counts; across ranks each captions its share of the
        uncached ids into its rank file, rank 0 merges them (between barriers), other ranks get (None, {})."""
        c, path, name = self.config, self.cache_path, self.captioner.name
        # first what a killed run's ranks left; across ranks rank 0 also opens the cache alone, so that it cuts
        # (and counts) a torn last line before the ranks read it
        leftovers = merge_rank_caches(path, name) if path is not None and ranks.rank == 0 else None
        if leftovers is None and ranks.world > 1 and ranks.rank == 0:
            leftovers = CaptionCache(path, name)
        torn = leftovers.torn_lines if leftovers is not None else 0
        if ranks.world == 1:
            run = caption_images(self.captioner, needed, images, cache_path=path,
                                 batch_size=c.caption_batch_size, skip_empty=c.skip_empty,
                                 show_progress=self.show_progress)
            return run.captions, {"needed": len(needed), "new": run.new, "cached": run.cached,
                                  "skipped": len(run.skipped), "torn_cache_lines": torn + run.torn_lines}
        ranks.barrier()  # every rank reads the cache once rank 0 has merged and cut it
        known = CaptionCache(path, name).captions
        todo = [i for i in needed if i not in known]
        start, stop = ranks.span(len(todo))
        caption_images(self.captioner, todo[start:stop], images,
                       cache_path=rank_cache_path(path, ranks.rank, ranks.world), batch_size=c.caption_batch_size,
                       skip_empty=c.skip_empty, show_progress=self._progress(ranks))
        ranks.barrier()  # every share captioned
        captions: dict[str, str] | None = None
        if ranks.rank == 0:
            merged = merge_rank_caches(path, name) or CaptionCache(path, name)
            captions = {i: merged.captions[i] for i in needed if i in merged.captions}
        ranks.barrier()  # the cache holds every caption; the rank files are gone
        if captions is None:
            return None, {}
        new = sum(1 for i in todo if i in captions)
        return captions, {"needed": len(needed), "new": new, "cached": len(needed) - len(todo),
                          "skipped": len(todo) - new, "torn_cache_lines": torn + merged.torn_lines}

    def _keep(self, pairs, captions) -> tuple[list[tuple[str, str, str, str]], dict[str, int]]:
        """(reference, target, reference caption, target caption) of the kept pairs, and the drop counts."""
        kept, same, kept_same, missing = [], 0, 0, 0
        for reference, target in pairs:
            r_cap, t_cap = captions.get(reference), captions.get(target)
            if r_cap is None or t_cap is None:
                missing += 1
                continue
            if " ".join(r_cap.split()).lower() == " ".join(t_cap.split()).lower():
                if not self.config.keep_equal_captions:
                    same += 1  # the text would carry no modification
                    continue
                kept_same += 1
            kept.append((reference, target, r_cap, t_cap))
        return kept, {"skipped_same_caption": same, "kept_same_caption": kept_same, "skipped_no_caption": missing}

    def _rewrite(self, kept, filled):
        run = self.rewriter.rewrite_pairs([(r_cap, t_cap) for _, _, r_cap, t_cap in kept], filled,
                                          cache_path=self.rewrite_cache_path, show_progress=self.show_progress)
        if len(run.texts) != len(kept):
            raise ModelProtocolError(explain(f"rewriter {self.rewriter.name} returned the wrong number of pairs",
                                             got=len(run.texts), expected=len(kept)))
        return run.texts, run.summary(self.rewriter.name)

    def _triplets(self, kept, filled) -> tuple[list[Triplet], int]:
        """The length rule on each pair's candidate texts, then the seeded ``max_triplets`` subsample."""
        c, window = self.config, self.config.window
        span = (window.start, window.stop)  # (-1, -1) for any image: parse_rank_window normalises it
        self.text_maker.fallbacks_used = 0
        triplets = []
        for (reference, target, r_cap, t_cap), candidates in zip(kept, filled):
            made = self.text_maker.finish(candidates, t_cap)
            meta = {"reference_caption": r_cap, "target_caption": t_cap,
                    "templates": [origin for origin, _ in made], "rank_window": list(span),
                    "seed": c.seed, "captioner": self.captioner.name}
            if self.rewriter is not None:
                meta["rewriter"] = self.rewriter.name
            triplets.append(Triplet(reference=reference, texts=tuple(text for _, text in made), target=target,
                                    source="generated", meta=meta))
        before = len(triplets)
        if c.max_triplets is not None and len(triplets) > c.max_triplets:
            keep = sorted(random.Random(c.seed).sample(range(len(triplets)), c.max_triplets))
            triplets = [triplets[k] for k in keep]
        return triplets, before


@dataclass(frozen=True)
class RankShare:
    """This process's place among the ranks generating together, and the augmenter's collectives (no-ops in one
    process; on the rank's CUDA device under nccl, else on CPU)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, shard: Any) -> RankShare:
        if shard is None:
            return cls()
        if not isinstance(shard, (tuple, list)) or len(shard) != 2:
            raise ConfigError(explain("shard must be (rank, world)", got=shard,
                                      fix="pass shard=distributed_rank() under torchrun, or None"))
        rank, world = shard
        shard_rows(0, rank, world)  # ConfigError unless ints with 0 <= rank < world
        if world > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError(explain("augment(shard=...) over several ranks needs an initialised process group",
                                          got=shard, fix="run under torchrun and pass shard=distributed_rank() "
                                                         "(cir_plugins.training.loop), or shard=None"))
            if (dist.get_rank(), dist.get_world_size()) != (rank, world):
                raise ConfigError(explain("shard is not this process's place in the process group", got=shard,
                                          expected=(dist.get_rank(), dist.get_world_size()),
                                          fix="pass shard=distributed_rank()"))
        return cls(rank, world)

    def span(self, n: int, align: int = 1, rank: int | None = None) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``n`` that ``rank`` (default: this one) takes, in whole blocks of ``align``."""
        start, stop = shard_rows(-(-n // align), self.rank if rank is None else rank, self.world)
        return min(start * align, n), min(stop * align, n)

    def _device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def gather(self, local: torch.Tensor, n: int, align: int) -> torch.Tensor:
        """Every rank's ``span(n, align)`` rows in rank order: ``local`` (m, ...) -> (n, ...) on CPU, on every rank."""
        if self.world == 1:
            return local
        spans = [self.span(n, align, r) for r in range(self.world)]
        width = max(stop - start for start, stop in spans)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=self._device())
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:stop - start] for part, (start, stop) in zip(parts, spans)]).cpu()

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (each passes one of the same shape and dtype)."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self._device())
        dist.broadcast(moved, src=0)
        return moved.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
