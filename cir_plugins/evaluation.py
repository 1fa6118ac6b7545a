"""Exact FashionIQ / CIRR evaluation of any CIR model (the CIRR test-server files: :mod:`cir_plugins.submission`).

Protocols (docs/method.md section 5):

- **CIRR** (also the synthetic world): gallery = every image of the split; the reference image is removed
  from each query's ranking; R@1/5/10/50; Recall_subset@1/2/3 ranks only the query's ``img_set.members``
  minus the reference; Rmean = (R@5 + Rs@1) / 2.
- **FashionIQ** (per category): gallery = every image of the category split; query text ``triplet.texts[0]``
  ("c0 and c1"); R@10, R@50. The standard protocol (and the original CLIP4Cir code) keeps the reference in
  the gallery (``remove_reference=False``, default); the method's release removed it for its CLIP4Cir and
  zero-shot rows and kept it for SPRC, BLIP4CIR and TG-CIR (each recipe in cir_plugins/recipes says which).
  Given the three category splits, also "Avg R@10", "Avg R@50" and Rmean = (Avg R@10 + Avg R@50) / 2.

Every result carries ``result["protocol"] = {"name", "reference_removed", "similarity", ...}`` so a number
says how it was obtained. Gallery images and references are embedded once (:mod:`cir_plugins.embedding`);
queries and gallery are L2-normalised along the last dim. The library does not print; examples do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._console import format_values
from ._utils import eval_mode, model_device
from .checks import check_positive_int
from .embedding import compose_triplets, embed_images
from .errors import ConfigError, DataError, ShapeError, explain
from .metrics import retrieval_metrics
from .protocol import require_protocol, similarity_of

__all__ = ["evaluate", "extract_features", "EvalFeatures", "metrics_from_features", "protocol_rows", "gallery_rows",
           "ProtocolRows", "CIRR_KS", "CIRR_SUBSET_KS", "FASHIONIQ_KS"]

logger = logging.getLogger(__name__)

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
PROTOCOLS = ("cirr", "fashioniq")


@dataclass
class EvalFeatures:
    """Normalised features of one split."""

    query: torch.Tensor  # (Q, D) L2-normalised composed queries, in ``triplets`` order
    gallery: torch.Tensor  # (N, D) or (N, T, D) L2-normalised gallery embeddings, row i is gallery_ids[i]
    gallery_ids: list[str]
    triplets: list  # the queries
    similarity: str  # "dot" or "max_token"
    row_of: dict[str, int] = field(default_factory=dict)  # gallery id -> row

    def __post_init__(self) -> None:
        if not self.row_of:
            self.row_of = {image_id: row for row, image_id in enumerate(self.gallery_ids)}


def extract_features(model: Any, split: Any, *, batch_size: int = 64, device: torch.device | str | None = None,
                     show_progress: bool = True) -> EvalFeatures:
    """Embed the split's gallery once and compose every query (no_grad; eval mode restored).

    Args:
        model: a CIRModel; split: a Split (``.triplets``, ``.gallery_ids``, ``.images``).
        batch_size: images / queries per forward call; show_progress: tqdm bars.
        device: where to run; None = the model's parameter device (CPU for parameter-less models).
    Returns EvalFeatures with query (Q, D) and gallery (N, D) or (N, T, D), both L2-normalised.
    """
    check_positive_int("batch_size", batch_size)
    require_protocol(model, "evaluation")
    triplets, gallery_ids = list(split.triplets), list(split.gallery_ids)
    if not triplets or not gallery_ids:
        raise DataError(explain("nothing to evaluate: the split has no queries or no gallery",
                                got=(len(triplets), len(gallery_ids)), fix="load a split with triplets"))
    if len(set(gallery_ids)) != len(gallery_ids):
        raise DataError(explain("the gallery lists an image twice", got=len(gallery_ids) - len(set(gallery_ids)),
                                fix="de-duplicate split.gallery_ids"))
    device = torch.device(device) if device is not None else model_device(model)
    similarity = similarity_of(model)
    with eval_mode(model), torch.no_grad():
        gallery = embed_images(model.encode_image, gallery_ids, split.images, batch_size=batch_size,
                               device=device, show_progress=show_progress, desc="evaluate: gallery")
        want = 2 if similarity == "dot" else 3
        if gallery.dim() != want:
            raise ShapeError(explain(f"encode_image returned {gallery.dim()}-D embeddings but the model's "
                                     f"similarity is {similarity!r}", got=tuple(gallery.shape),
                                     expected="(N, D)" if want == 2 else "(N, T, D)",
                                     fix="set model.similarity ('dot' for (N, D), 'max_token' for (N, T, D))"))
        query = compose_triplets(model, split.images, triplets, batch_size=batch_size, device=device,
                                 show_progress=show_progress)
    if query.dim() != 2 or query.shape[0] != len(triplets) or query.shape[1] != gallery.shape[-1]:
        raise ShapeError(explain("compose_query must return (B, D) with the gallery's D", got=tuple(query.shape),
                                 expected=f"({len(triplets)}, {gallery.shape[-1]})", fix="check the model's output"))
    query = F.normalize(query.float(), dim=-1)  # (Q, D)
    gallery = F.normalize(gallery.float(), dim=-1)  # (N, D) or (N, T, D): each token normalised
    return EvalFeatures(query=query, gallery=gallery, gallery_ids=gallery_ids, triplets=triplets,
                        similarity=similarity)


def gallery_rows(features: EvalFeatures, ids: Sequence[str], what: str) -> torch.Tensor:
    """(len(ids),) int64 gallery rows of ``ids``; a DataError naming ``what`` when one is not in the gallery."""
    if missing := [i for i in ids if i not in features.row_of]:
        raise DataError(explain(f"{what} not in the gallery", got=missing[:5],
                                fix="every reference, target and group member must be a gallery image"))
    return torch.tensor([features.row_of[i] for i in ids], dtype=torch.int64, device=features.query.device)


@dataclass
class ProtocolRows:
    """The gallery rows a protocol scores for each query of an :class:`EvalFeatures`."""

    target: torch.Tensor  # (Q,) target rows
    exclude: torch.Tensor | None  # (Q, 1) reference rows removed (-1 where reference == target), None if kept
    subset: torch.Tensor | None  # (Q, S) CIRR img_set members minus the reference, -1 padded, or None
    reference_removed: bool
    reference_equals_target: int  # queries whose reference is their target


def protocol_rows(features: EvalFeatures, *, protocol: str, remove_reference: bool | None = None) -> ProtocolRows:
    """The one place that turns a protocol into rows: reference removal (CIRR by default) and subsets."""
    if protocol not in PROTOCOLS:
        raise ConfigError(explain("unknown evaluation protocol", got=protocol, expected=PROTOCOLS))
    triplets = features.triplets
    if no_target := [i for i, t in enumerate(triplets) if t.target is None]:
        raise DataError(explain("queries without targets cannot be scored locally", got=f"{len(no_target)} queries",
                                fix="use rank_cirr / submit_cirr for the CIRR test split"))
    remove = (protocol == "cirr") if remove_reference is None else bool(remove_reference)
    target_rows = gallery_rows(features, [t.target for t in triplets], "target images")  # (Q,)
    ref_rows = gallery_rows(features, [t.reference for t in triplets], "reference images")  # (Q,)
    exclude = ref_rows.masked_fill(ref_rows == target_rows, -1)[:, None] if remove else None  # (Q, 1), -1 = keep
    subset = None
    if protocol == "cirr" and triplets and all(t.members for t in triplets):
        width = max(len(t.members) for t in triplets)
        subset = torch.full((len(triplets), width), -1, dtype=torch.int64, device=features.query.device)
        for i, t in enumerate(triplets):
            others = [m for m in t.members if m != t.reference]
            if t.target not in others:
                raise DataError(explain(f"query {i} (pair {t.pair_id}): the target is not in img_set.members",
                                        got=t.target, fix="fix the annotation's img_set"))
            subset[i, :len(others)] = gallery_rows(features, others, "img_set members")  # (S,) padded with -1
    return ProtocolRows(target_rows, exclude, subset, remove, int((ref_rows == target_rows).sum()))


def metrics_from_features(features: EvalFeatures, *, protocol: str, remove_reference: bool | None = None,
                          chunk_size: int | None = None) -> dict:
    """The protocol's metrics from extracted features (see module docstring). Values in percent."""
    rows = protocol_rows(features, protocol=protocol, remove_reference=remove_reference)
    if rows.reference_removed and rows.reference_equals_target:
        logger.warning("%d queries have reference == target; their reference is kept", rows.reference_equals_target)
    result = retrieval_metrics(features.query, features.gallery, rows.target, exclude_rows=rows.exclude,
                               ks=CIRR_KS if protocol == "cirr" else FASHIONIQ_KS, subset_rows=rows.subset,
                               subset_ks=CIRR_SUBSET_KS, chunk_size=chunk_size, similarity=features.similarity)
    return {**result, "n_queries": len(features.triplets), "n_gallery": len(features.gallery_ids),
            "protocol": {"name": protocol, "reference_removed": rows.reference_removed,
                         "similarity": features.similarity, "subset": rows.subset is not None,
                         "reference_equals_target": rows.reference_equals_target}}


def evaluate(model: Any, split: Any, *, protocol: str | None = None, batch_size: int = 64,
             device: torch.device | str | None = None, show_progress: bool = True,
             remove_reference: bool | None = None, chunk_size: int | None = None) -> dict:
    """Evaluate ``model`` (a CIRModel) on a split with the exact protocol (module docstring).

    Args:
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
        out: dict[str, Any] = {s.category: evaluate(model, s, protocol="fashioniq", batch_size=batch_size,
                                                    device=device, show_progress=show_progress,
                                                    remove_reference=remove_reference, chunk_size=chunk_size)
                               for s in split}
        out.update({f"Avg R@{k}": sum(out[c][f"R@{k}"] for c in categories) / len(categories) for k in FASHIONIQ_KS})
        out["Rmean"] = (out["Avg R@10"] + out["Avg R@50"]) / 2.0
        out["protocol"] = {**out[categories[0]]["protocol"], "categories": categories, "split": split[0].split}
        return out
    name = protocol if protocol is not None else getattr(split, "protocol", None)
    if name not in PROTOCOLS:
        raise ConfigError(explain("unknown evaluation protocol", got=name, expected=PROTOCOLS,
                                  fix="pass protocol='cirr' or 'fashioniq'"))
    features = extract_features(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    result = metrics_from_features(features, protocol=name, remove_reference=remove_reference, chunk_size=chunk_size)
    result["protocol"].update({key: getattr(split, key, None) for key in ("dataset", "split", "category")})
    logger.info("evaluated %s: %s", split, format_values(result))
    return result
