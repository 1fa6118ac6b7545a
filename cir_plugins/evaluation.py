"""Exact FashionIQ / CIRR evaluation of any CIR model, and the CIRR test-server files.

Protocols (see METHOD.md section 5):

- **CIRR** (also the synthetic world): gallery = every image of the split; the reference image is
  removed from each query's ranking; R@1/5/10/50; Recall_subset@1/2/3 ranks only the query's
  ``img_set.members`` minus the reference; Rmean = (R@5 + Rs@1) / 2.
- **FashionIQ** (per category): gallery = every image of the category split; query text is
  ``triplet.texts[0]`` ("c0 and c1"); R@10, R@50. The standard protocol keeps the reference in
  the gallery (``remove_reference=False``, default; the original CLIP4Cir code does too);
  ``remove_reference=True`` is how the method's release evaluated its CLIP4Cir and zero-shot rows
  (it kept the reference for SPRC, BLIP4CIR and TG-CIR; each recipe in cir_plugins/recipes says which). Given the three category splits, also "Avg R@10", "Avg R@50" and
  Rmean = (Avg R@10 + Avg R@50) / 2.

Every result dict carries ``result["protocol"] = {"name", "reference_removed", "similarity", ...}``
so a reported number says how it was obtained. The library does not print; examples do.

Features: each gallery image is embedded once (``encode_image``, batched, no_grad, eval mode
restored afterwards); query references use ``encode_reference`` features when the model has that
method (computed once per distinct reference id), else the reference images. Queries and gallery
are L2-normalised along the last dim; ranking uses :mod:`cir_plugins.metrics` (cosine, or max over
tokens for (N, T, D) galleries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from ._console import format_values, progress_bar

from ._atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from ._utils import eval_mode, model_device
from .errors import ConfigError, DataError, ModelProtocolError, NonFiniteError, ShapeError, SubmissionError, explain
from .metrics import retrieval_metrics, topk_rows

__all__ = [
    "evaluate",
    "extract_features",
    "EvalFeatures",
    "metrics_from_features",
    "rank_cirr",
    "CIRRRanking",
    "write_cirr_submission",
    "submit_cirr",
    "validate_cirr_submission",
    "check_cirr_submission",
    "embed_images",
    "CIRR_KS",
    "CIRR_SUBSET_KS",
    "FASHIONIQ_KS",
]

logger = logging.getLogger(__name__)

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
PROTOCOLS = ("cirr", "fashioniq")


# --------------------------------------------------------------------------------------------
# feature extraction


def _similarity(model: Any) -> str:
    from .protocol import similarity_of

    return similarity_of(model)


def _reference_encoder(model: Any):
    encode_reference = getattr(model, "encode_reference", None)
    return encode_reference if callable(encode_reference) else None


def _require_images(images: Mapping[str, torch.Tensor], ids: Sequence[str]) -> None:
    """DataError naming the ids that ``images`` lacks (all of them, checked before any work)."""
    missing = [i for i in ids if i not in images]
    if missing:
        raise DataError(explain(f"{len(missing)} image ids have no image", got=missing[:5],
                                fix="pass an images mapping (e.g. the split's images) that covers every id"))


def _stack(images: Mapping[str, torch.Tensor], ids: Sequence[str]) -> torch.Tensor:
    """(n, C, H, W) tensor of ``ids`` from any Mapping (ImageStore.batch when it returns one row per id)."""
    batch = getattr(images, "batch", None)
    # an ImageStore in skip mode returns (tensor, kept ids) from .batch: one row per id is needed here
    if callable(batch) and getattr(images, "on_error", "error") == "error":
        return batch(list(ids))
    return torch.stack([images[i] for i in ids])  # (n, C, H, W)


def embed_images(encoder: Callable[[torch.Tensor], torch.Tensor], image_ids: Sequence[str],
                 images: Mapping[str, torch.Tensor], *, batch_size: int = 64,
                 device: torch.device | str | None = None, output_device: torch.device | str | None = None,
                 pool_tokens: bool = False, texts: Sequence[str] | None = None, show_progress: bool = True,
                 desc: str = "embed images") -> torch.Tensor:
    """Run ``encoder`` (e.g. ``model.encode_image``) over ``image_ids`` in batches, under no_grad.

    The package's one image-embedding loop (the bank's resumable, multi-worker build aside): evaluation,
    pairing and the training reference cache use it. The caller chooses eval mode
    (:func:`cir_plugins._utils.eval_mode`).

    Args:
        encoder: images (n, C, H, W) -> (n, ...) tensor, one row per image; with ``texts``,
            ``encoder(images, texts)`` (a reference side that reads the text: protocol.reference_uses_text).
        image_ids: the ids to embed, in output order.
        images: id -> (C, H, W) tensor (any Mapping; an ImageStore reads from disk).
        device: where each batch goes; None = the encoder's device (the module of a bound method such
            as ``model.encode_image``), or left where it is for a plain function or offloaded (meta) weights.
        output_device: where each output batch is moved before concatenation (e.g. "cpu"); None = kept.
        pool_tokens: mean-pool multi-vector outputs (n, T, D) -> (n, D); then outputs must be 2-D or 3-D.
        texts: one text per id (ids may then repeat), passed batch by batch beside the images.
        show_progress, desc: a tqdm bar and its label.

    Returns (len(image_ids), ...) in the encoder's dtype; (0, 0) for no ids. A missing id is a DataError,
    a wrong row count a ModelProtocolError, a NaN or infinity a NonFiniteError naming the images.

    The argument order (encoder, image_ids, images) is that of ``NegativeBank.build`` and ``pair_images``;
    the former ``evaluation.embed_images(fn, images, ids)`` order still works, with a DeprecationWarning.
    """
    if isinstance(image_ids, Mapping) and not isinstance(images, Mapping):
        warnings.warn("embed_images(fn, images, ids) is deprecated: pass embed_images(encoder, image_ids, images)",
                      DeprecationWarning, stacklevel=2)
        image_ids, images = images, image_ids
    _check_batch_size(batch_size)
    if not callable(encoder):
        raise ModelProtocolError(explain("the image encoder must be callable (images (n, C, H, W) -> (n, D))",
                                         got=type(encoder).__name__, fix="pass a function or a model's encode_image"))
    image_ids = list(image_ids)
    _require_images(images, image_ids)
    if texts is not None and len(texts) != len(image_ids):
        raise ShapeError(explain(f"{desc}: one text per image id is needed", got=(len(image_ids), len(texts))))
    device = torch.device(device) if device is not None else model_device(encoder, default=None)
    outputs = []
    with torch.no_grad():
        for start in progress_bar(range(0, len(image_ids), batch_size), desc=desc, show_progress=show_progress, leave=False,
                          unit="batch"):
            ids = image_ids[start:start + batch_size]
            pixels = _stack(images, ids)  # (n, C, H, W)
            if device is not None:
                pixels = pixels.to(device, non_blocking=True)
            out = encoder(pixels) if texts is None else encoder(pixels, list(texts[start:start + batch_size]))
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != len(ids) \
                    or (pool_tokens and out.dim() not in (2, 3)):
                raise ModelProtocolError(explain(f"{desc}: the encoder must return one row per image",
                                                 got=getattr(out, "shape", type(out).__name__),
                                                 expected=f"({len(ids)}, D)" + (f" or ({len(ids)}, T, D)"
                                                                                 if pool_tokens else ", ..."),
                                                 fix="return a (N, D) or (N, T, D) tensor"))
            if pool_tokens and out.dim() == 3:
                out = out.mean(dim=1)  # (n, T, D) -> (n, D): pool the tokens
            finite = torch.isfinite(out.reshape(len(ids), -1)).all(dim=1)  # (n,) one flag per image
            if not bool(finite.all()):
                bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
                raise NonFiniteError(explain(f"{desc}: the encoder returned NaN or infinity for {len(bad)} image(s)",
                                             got=bad[:10], expected="finite embeddings",
                                             fix="check those images (corrupt or constant pixels) or the model"))
            outputs.append(out.detach() if output_device is None else out.detach().to(output_device))
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs)


@dataclass
class EvalFeatures:
    """Normalised features of one split.

    Fields:
        query: (Q, D) L2-normalised composed queries, in ``triplets`` order.
        gallery: (N, D) or (N, T, D) L2-normalised gallery embeddings, in ``gallery_ids`` order.
        gallery_ids: the gallery's image ids (row i of ``gallery``).
        triplets: the queries.
        similarity: "dot" or "max_token".
    """

    query: torch.Tensor
    gallery: torch.Tensor
    gallery_ids: list[str]
    triplets: list
    similarity: str
    row_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.row_of:
            self.row_of = {image_id: row for row, image_id in enumerate(self.gallery_ids)}


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(explain("batch_size must be a positive int", got=batch_size, fix="e.g. batch_size=64"))


def extract_features(model: Any, split: Any, *, batch_size: int = 64, device: torch.device | str | None = None,
                     show_progress: bool = True) -> EvalFeatures:
    """Embed the split's gallery once and compose every query (no_grad; eval mode restored).

    Args:
        model: meets the CIRModel protocol (encode_image, compose_query, optional encode_reference).
        split: a Split (``.triplets``, ``.gallery_ids``, ``.images``).
        batch_size: images / queries per forward call.
        device: where to run; None = the model's parameter device (CPU for parameter-less models).
        show_progress: tqdm bars.
    Returns:
        EvalFeatures with query (Q, D) and gallery (N, D) or (N, T, D), both L2-normalised.
    """
    _check_batch_size(batch_size)
    from .protocol import require_protocol

    require_protocol(model, "evaluation")
    triplets, gallery_ids = list(split.triplets), list(split.gallery_ids)
    if not triplets or not gallery_ids:
        raise DataError(explain("nothing to evaluate: the split has no queries or no gallery",
                                got=(len(triplets), len(gallery_ids)), fix="load a split with triplets"))
    if len(set(gallery_ids)) != len(gallery_ids):
        raise DataError(explain("the gallery lists an image twice", got=len(gallery_ids) - len(set(gallery_ids)),
                                fix="de-duplicate split.gallery_ids"))
    device = torch.device(device) if device is not None else model_device(model)
    similarity = _similarity(model)
    with eval_mode(model), torch.no_grad():
        gallery = embed_images(model.encode_image, gallery_ids, split.images, batch_size=batch_size,
                               device=device, show_progress=show_progress, desc="evaluate: gallery")
        want = 2 if similarity == "dot" else 3
        if gallery.dim() != want:
            raise ShapeError(explain(f"encode_image returned {gallery.dim()}-D embeddings but the model's "
                                     f"similarity is {similarity!r}", got=tuple(gallery.shape),
                                     expected="(N, D)" if want == 2 else "(N, T, D)",
                                     fix="set model.similarity ('dot' for (N, D), 'max_token' for (N, T, D))"))
        query = _compose_all(model, split.images, triplets, batch_size, device, show_progress)
    if query.dim() != 2 or query.shape[0] != len(triplets) or query.shape[1] != gallery.shape[-1]:
        raise ShapeError(explain("compose_query must return (B, D) with the gallery's D", got=tuple(query.shape),
                                 expected=f"({len(triplets)}, {gallery.shape[-1]})", fix="check the model's output"))
    query = F.normalize(query.float(), dim=-1)  # (Q, D)
    gallery = F.normalize(gallery.float(), dim=-1)  # (N, D) or (N, T, D): each token normalised
    return EvalFeatures(query=query, gallery=gallery, gallery_ids=gallery_ids, triplets=triplets,
                        similarity=similarity)


def _compose_all(model, images, triplets, batch_size, device, show_progress) -> torch.Tensor:
    """(Q, D) raw composed queries; references encoded once per distinct id when possible (per query
    batch when ``encode_reference`` reads the texts too: protocol.reference_uses_text)."""
    from .protocol import compose, reference_input, reference_uses_text

    encode_reference = _reference_encoder(model)
    _require_images(images, [t.reference for t in triplets])
    cached = None
    if encode_reference is not None and not reference_uses_text(model):
        unique = list(dict.fromkeys(t.reference for t in triplets))
        head = unique[:batch_size]
        first = encode_reference(_stack(images, head).to(device))
        if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == len(head):
            rest = unique[batch_size:]
            parts = [first]
            if rest:
                parts.append(embed_images(encode_reference, rest, images, batch_size=batch_size, device=device,
                                          show_progress=show_progress, desc="evaluate: references"))
            cached = (torch.cat(parts), {r: i for i, r in enumerate(unique)})  # (R, ...) one row per reference id
        else:  # structured (non-tensor) features cannot be indexed by row: encode per query batch
            logger.debug("encode_reference returned %s; encoding references per query batch", type(first).__name__)
    outputs = []
    for start in progress_bar(range(0, len(triplets), batch_size), desc="evaluate: queries", show_progress=show_progress,
                      leave=False):
        chunk = triplets[start:start + batch_size]
        if cached is not None:
            feats, index = cached
            reference = feats[torch.tensor([index[t.reference] for t in chunk], device=feats.device)]
        else:
            pixels = _stack(images, [t.reference for t in chunk]).to(device)
            reference = reference_input(model, pixels, [t.texts[0] for t in chunk])
        out = compose(model, reference, [t.texts[0] for t in chunk])
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(chunk):
            raise ModelProtocolError(explain("compose_query must return a (B, D) tensor",
                                             got=getattr(out, "shape", type(out).__name__),
                                             expected=f"({len(chunk)}, D)", fix="return one embedding per query"))
        outputs.append(out)
    return torch.cat(outputs)  # (Q, D)


# --------------------------------------------------------------------------------------------
# metrics


def _rows(features: EvalFeatures, ids: Sequence[str], what: str) -> torch.Tensor:
    missing = [i for i in ids if i not in features.row_of]
    if missing:
        raise DataError(explain(f"{what} not in the gallery", got=missing[:5],
                                fix="every reference, target and group member must be a gallery image"))
    return torch.tensor([features.row_of[i] for i in ids], dtype=torch.int64, device=features.query.device)


def metrics_from_features(features: EvalFeatures, *, protocol: str, remove_reference: bool | None = None,
                          chunk_size: int | None = None) -> dict:
    """The protocol's metrics from extracted features (see module docstring). Values in percent."""
    if protocol not in PROTOCOLS:
        raise ConfigError(explain("unknown evaluation protocol", got=protocol, expected=PROTOCOLS))
    triplets = features.triplets
    no_target = [i for i, t in enumerate(triplets) if t.target is None]
    if no_target:
        raise DataError(explain("queries without targets cannot be scored locally", got=f"{len(no_target)} queries",
                                fix="use rank_cirr / submit_cirr for the CIRR test split"))
    remove = (protocol == "cirr") if remove_reference is None else bool(remove_reference)
    target_rows = _rows(features, [t.target for t in triplets], "target images")  # (Q,)
    ref_rows = _rows(features, [t.reference for t in triplets], "reference images")  # (Q,)
    exclude = None
    same = int((ref_rows == target_rows).sum())
    if remove:
        exclude = ref_rows.masked_fill(ref_rows == target_rows, -1)[:, None]  # (Q, 1), -1 = keep
        if same:
            logger.warning("%d queries have reference == target; their reference is kept", same)
    ks = CIRR_KS if protocol == "cirr" else FASHIONIQ_KS
    subset = None
    if protocol == "cirr" and all(t.members for t in triplets):
        width = max(len(t.members) for t in triplets)
        subset = torch.full((len(triplets), width), -1, dtype=torch.int64, device=features.query.device)
        for i, t in enumerate(triplets):
            others = [m for m in t.members if m != t.reference]
            if t.target not in others:
                raise DataError(explain(f"query {i} (pair {t.pair_id}): the target is not in img_set.members",
                                        got=t.target, fix="fix the annotation's img_set"))
            subset[i, :len(others)] = _rows(features, others, "img_set members")  # (S,) padded with -1
    result = retrieval_metrics(features.query, features.gallery, target_rows, ks=ks, exclude_rows=exclude,
                               subset_rows=subset, subset_ks=CIRR_SUBSET_KS, chunk_size=chunk_size,
                               similarity=features.similarity)
    result["n_queries"] = len(triplets)
    result["n_gallery"] = len(features.gallery_ids)
    result["protocol"] = {"name": protocol, "reference_removed": remove, "similarity": features.similarity,
                          "subset": subset is not None, "reference_equals_target": same}
    return result


def _split_info(split: Any) -> dict:
    return {"dataset": getattr(split, "dataset", None), "split": getattr(split, "split", None),
            "category": getattr(split, "category", None)}


def evaluate(model: Any, split: Any, *, protocol: str | None = None, batch_size: int = 64,
             device: torch.device | str | None = None, show_progress: bool = True,
             remove_reference: bool | None = None, chunk_size: int | None = None) -> dict:
    """Evaluate ``model`` on a split with the exact protocol (module docstring).

    Args:
        model: CIRModel (encode_image, compose_query, optional encode_reference / similarity).
        split: a Split; or a list/tuple of FashionIQ category Splits (then per-category results plus
            "Avg R@10", "Avg R@50", "Rmean").
        protocol: "cirr" or "fashioniq"; None takes ``split.protocol``.
        batch_size, device, show_progress: feature extraction (see :func:`extract_features`).
        remove_reference: None = the protocol's standard (CIRR: removed; FashionIQ: kept).
        chunk_size: gallery rows scored at once in the metrics (None: sized from memory).

    Returns:
        CIRR: {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean", "n_queries",
        "n_gallery", "protocol": {...}}. FashionIQ (one split): {"R@10", "R@50", ...}; (several):
        {category: {...}, "Avg R@10", "Avg R@50", "Rmean", "protocol": {...}}. Percentages.
    """
    if isinstance(split, (list, tuple)):
        if not split:
            raise ConfigError(explain("an empty list of splits", got=split, fix="pass the three category splits"))
        protocols = {protocol or s.protocol for s in split}
        if protocols != {"fashioniq"}:
            raise ConfigError(explain("a list of splits is only for FashionIQ categories", got=sorted(protocols),
                                      fix="evaluate CIRR splits one at a time"))
        categories = [s.category for s in split]
        if len(set(categories)) != len(categories):
            raise ConfigError(explain("each FashionIQ category may appear once", got=categories))
        out: dict[str, Any] = {}
        for s in split:
            out[s.category] = evaluate(model, s, protocol="fashioniq", batch_size=batch_size, device=device,
                                       show_progress=show_progress, remove_reference=remove_reference,
                                       chunk_size=chunk_size)
        for k in FASHIONIQ_KS:
            out[f"Avg R@{k}"] = sum(out[c][f"R@{k}"] for c in categories) / len(categories)
        out["Rmean"] = (out["Avg R@10"] + out["Avg R@50"]) / 2.0
        first = out[categories[0]]["protocol"]
        out["protocol"] = {**first, "categories": categories, "split": split[0].split}
        return out
    name = protocol if protocol is not None else getattr(split, "protocol", None)
    if name not in PROTOCOLS:
        raise ConfigError(explain("unknown evaluation protocol", got=name, expected=PROTOCOLS,
                                  fix="pass protocol='cirr' or 'fashioniq'"))
    features = extract_features(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    result = metrics_from_features(features, protocol=name, remove_reference=remove_reference, chunk_size=chunk_size)
    result["protocol"].update(_split_info(split))
    logger.info("evaluated %s: %s", split, format_values(result))
    return result


# --------------------------------------------------------------------------------------------
# CIRR test submission


@dataclass
class CIRRRanking:
    """Per-query rankings for the CIRR server.

    Fields:
        pair_ids: the queries' pair ids, in split order.
        recall_names: per query, the ``k`` best gallery names (reference excluded), best first.
        subset_names: per query, the ``subset_k`` best names among img_set.members minus the reference.
    """

    pair_ids: list[int]
    recall_names: list[list[str]]
    subset_names: list[list[str]]


def _subset_order(features: EvalFeatures, query_index: int, rows: list[int]) -> list[int]:
    """Rows sorted best first (ties: lower row first) by the model's similarity."""
    q = features.query[query_index]  # (D,)
    g = features.gallery[torch.tensor(rows, device=q.device)]  # (S, D) or (S, T, D)
    scores = g @ q if features.similarity == "dot" else (g @ q).amax(dim=1)  # (S,) or (S, T) -> (S,)
    return [r for _, r in sorted(zip((-scores).tolist(), rows))]


def ranking_from_features(features: EvalFeatures, *, k: int = 50, subset_k: int = 3,
                          chunk_size: int | None = None) -> CIRRRanking:
    """Top-``k`` gallery names per query (reference removed) and top-``subset_k`` group names."""
    triplets = features.triplets
    ref_rows = _rows(features, [t.reference for t in triplets], "reference images")
    _, rows = topk_rows(features.query, features.gallery, k, exclude_rows=ref_rows[:, None], chunk_size=chunk_size,
                        similarity=features.similarity)  # (Q, k)
    recall_names, subset_names = [], []
    for i, t in enumerate(triplets):
        recall_names.append([features.gallery_ids[r] for r in rows[i].tolist() if r >= 0])
        others = [m for m in t.members if m != t.reference]
        if len(others) < subset_k:
            raise DataError(explain(f"query {i} (pair {t.pair_id}) has too few group members for the subset ranking",
                                    got=len(others), expected=f">= {subset_k} besides the reference",
                                    fix="check img_set.members"))
        order = _subset_order(features, i, _rows(features, others, "img_set members").tolist())
        subset_names.append([features.gallery_ids[r] for r in order[:subset_k]])
    return CIRRRanking(pair_ids=[t.pair_id for t in triplets], recall_names=recall_names, subset_names=subset_names)


def rank_cirr(model: Any, split: Any, *, k: int = 50, subset_k: int = 3, batch_size: int = 64,
              device: torch.device | str | None = None, show_progress: bool = True) -> CIRRRanking:
    """The raw per-query rankings the CIRR server wants (works on splits without targets)."""
    features = extract_features(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    return ranking_from_features(features, k=k, subset_k=subset_k)


def _is_pair_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_cirr_submission(pair_ids: Sequence[int], recall_names: Sequence[Sequence[str]],
                             subset_names: Sequence[Sequence[str]], *, split: Any = None, k: int = 50,
                             subset_k: int = 3) -> None:
    """Raise SubmissionError for anything the server would reject (see write_cirr_submission)."""
    def fail(problem, got=None, expected=None, fix="regenerate the rankings with rank_cirr on the test1 split"):
        raise SubmissionError(explain(problem, got=got, expected=expected, fix=fix))

    if not (len(pair_ids) == len(recall_names) == len(subset_names)):
        fail("pair_ids, recall_names and subset_names differ in length",
             got=(len(pair_ids), len(recall_names), len(subset_names)), expected="three equal lengths")
    seen: set[int] = set()
    for pid in pair_ids:
        if not _is_pair_id(pid):
            fail("a pair id is not an int", got=pid)
        if pid in seen:
            fail("a pair id appears twice", got=pid, expected="each test pair exactly once")
        seen.add(pid)
    for names_list, want, label in ((recall_names, k, "recall"), (subset_names, subset_k, "recall_subset")):
        for pid, names in zip(pair_ids, names_list):
            if isinstance(names, str) or not isinstance(names, Sequence):
                fail(f"{label} names of pair {pid} must be a list", got=type(names).__name__)
            if len(names) != want:
                fail(f"{label} of pair {pid} has the wrong number of names", got=len(names), expected=want)
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    fail(f"{label} of pair {pid} has a name that is not a non-empty string", got=name)
                if name.lower().endswith((".png", ".jpg", ".jpeg")):
                    fail(f"{label} of pair {pid} has a file extension in a name", got=name,
                         expected="image names without extension")
            if len(set(names)) != len(names):
                fail(f"{label} of pair {pid} names an image twice", got=[n for n in names if list(names).count(n) > 1][:3])
    if split is None:
        logger.warning("CIRR submission validated without the split: pair coverage, reference exclusion, "
                       "group membership and gallery names were not checked")
        return
    by_pair = {t.pair_id: t for t in split.triplets}
    missing = sorted(set(by_pair) - seen)
    extra = sorted(seen - set(by_pair))
    if missing:
        fail("test pairs are missing from the submission", got=f"{len(missing)} missing, e.g. {missing[:5]}",
             expected=f"all {len(by_pair)} pairs of {getattr(split, 'split', 'the split')}")
    if extra:
        fail("the submission has pair ids that are not in the split", got=extra[:5])
    gallery = set(split.gallery_ids)
    for pid, recall, subset in zip(pair_ids, recall_names, subset_names):
        triplet = by_pair[pid]
        for label, names in (("recall", recall), ("recall_subset", subset)):
            if triplet.reference in names:
                fail(f"{label} of pair {pid} contains the reference image", got=triplet.reference,
                     expected="the reference excluded")
            unknown = [n for n in names if n not in gallery]
            if unknown:
                fail(f"{label} of pair {pid} names images not in the gallery", got=unknown[:3])
        allowed = set(triplet.members) - {triplet.reference}
        outside = [n for n in subset if n not in allowed]
        if outside:
            fail(f"recall_subset of pair {pid} names images outside img_set.members minus the reference",
                 got=outside, expected=sorted(allowed))


def write_cirr_submission(out_dir: str | os.PathLike, pair_ids: Sequence[int], recall_names: Sequence[Sequence[str]],
                          subset_names: Sequence[Sequence[str]], *, split: Any = None, version: str = "rc2",
                          name: str = "cirr") -> tuple[Path, Path]:
    """Validate and write the two CIRR server files; returns (path_recall, path_subset).

    Files: ``{out_dir}/recall_submission_{name}.json`` = {"version": version, "metric": "recall",
    "<pairid>": [50 names]} and ``{out_dir}/recall_subset_submission_{name}.json`` = {"version":
    version, "metric": "recall_subset", "<pairid>": [3 names]}; keys are str(pairid).

    Validation (SubmissionError, nothing written): equal lengths, int pair ids each once, 50 / 3
    unique non-empty names without extensions; with ``split`` (the test1 Split) also: every pair of
    the split present exactly once and no other, the reference excluded from both lists, names in
    the gallery, subset names from img_set.members minus the reference. Without ``split`` those
    cross-checks are skipped (logged as a warning).

    The two files are written as a pair: each atomically, with the manifest
    ``{out_dir}/submission_{name}.manifest.json`` (the SHA-256 of both) removed before the first
    and written after the second. After an interruption a reader finds either the complete new pair
    with its manifest, or no manifest (possibly a new recall file beside an old subset file):
    :func:`check_cirr_submission` tells the two apart; re-running the same call completes the pair.
    """
    validate_cirr_submission(pair_ids, recall_names, subset_names, split=split)
    if not isinstance(version, str) or not version:
        raise SubmissionError(explain("version must be a non-empty string", got=version, expected="rc2"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recall = {"version": version, "metric": "recall"}
    subset = {"version": version, "metric": "recall_subset"}
    for pid, names_r, names_s in zip(pair_ids, recall_names, subset_names):
        recall[str(pid)] = list(names_r)
        subset[str(pid)] = list(names_s)
    path_recall, path_subset, manifest = _submission_paths(out, name)
    if manifest.exists():  # from here until the new manifest is written, the pair is not one to upload
        manifest.unlink()
        fsync_dir(out)
    digests = {}
    for path, document in ((path_recall, recall), (path_subset, subset)):
        data = json.dumps(document).encode("utf-8")
        atomic_write_bytes(path, data)
        digests[path.name] = hashlib.sha256(data).hexdigest()
    atomic_write_json(manifest, {"format": SUBMISSION_FORMAT, "pairs": len(pair_ids), "files": digests}, indent=1)
    logger.info("wrote CIRR submission for %d pairs: %s, %s", len(pair_ids), path_recall, path_subset)
    return path_recall, path_subset


SUBMISSION_FORMAT = "cir_plugins.cirr_submission"


def _submission_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(recall file, recall_subset file, manifest) of submission ``name`` in ``out``."""
    return (out / f"recall_submission_{name}.json", out / f"recall_subset_submission_{name}.json",
            out / f"submission_{name}.manifest.json")


def check_cirr_submission(out_dir: str | os.PathLike, *, name: str = "cirr") -> tuple[Path, Path]:
    """The two files of a submission written whole by :func:`write_cirr_submission`, as a pair.

    Raises SubmissionError when the manifest is missing (an interrupted write: the files may be a new
    recall file beside an old subset file), unreadable, or when a file is missing or differs from
    the SHA-256 the manifest recorded. Returns (path_recall, path_subset).
    """
    out = Path(out_dir)
    path_recall, path_subset, manifest = _submission_paths(out, name)
    fix = "write the submission again (cir-plugins submit / write_cirr_submission); it completes the pair"
    if not manifest.is_file():
        raise SubmissionError(explain(f"the CIRR submission {name!r} in {out} is not a complete pair: its manifest "
                                      "is missing (the write was interrupted, or the files were not written by "
                                      "this library)", got=str(manifest), fix=fix))
    try:
        document = json.loads(manifest.read_text(encoding="utf-8"))
        files = document["files"]
        if document.get("format") != SUBMISSION_FORMAT or not isinstance(files, dict):
            raise ValueError("not a submission manifest")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SubmissionError(explain(f"{manifest} is unreadable", got=f"{type(error).__name__}: {error}",
                                      fix=fix)) from error
    for path in (path_recall, path_subset):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != files.get(path.name):
            raise SubmissionError(explain(f"{path} is missing or differs from the file written with its pair",
                                          got=str(path), expected=f"the SHA-256 recorded in {manifest.name}", fix=fix))
    return path_recall, path_subset


def submit_cirr(model: Any, split: Any, out_dir: str | os.PathLike, *, batch_size: int = 64,
                device: torch.device | str | None = None, show_progress: bool = True,
                name: str = "cirr") -> tuple[Path, Path]:
    """Rank the test1 split with ``model`` and write the two validated server files."""
    ranking = rank_cirr(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    return write_cirr_submission(out_dir, ranking.pair_ids, ranking.recall_names, ranking.subset_names,
                                 split=split, name=name)
