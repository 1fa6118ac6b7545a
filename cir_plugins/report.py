"""What a model retrieves: per-query target ranks (:func:`query_ranks`, counted as the metrics count, so per-query
hits average to the reported recalls) and a retrieval report (:func:`retrieval_report`) of a model on a split:

- ``report.html``: a self-contained page (images inlined as base64 PNG): per shown query the reference, the
  text, the top-``k`` candidates with the target outlined and the target's rank; with ``compare=`` a second
  model's top-``k`` beside the first, and the queries the first model wins (better target rank) and loses;
- ``report.png``: the same queries as one image grid (matplotlib);
- ``report.json``: every query's ranks (and, for shown queries, their top-``k`` ids).

Rankings use the split's protocol (CIRR: the reference removed from the candidates; FashionIQ: kept).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write_files
from .checks import check_positive_int
from .data.images import pil_loader, to_pil
from .errors import ConfigError, DataError, explain
from .evaluation import PROTOCOLS, EvalFeatures, extract_features, protocol_rows
from .metrics import subset_ranks, target_ranks, topk_rows
from .negatives.bank import exclusion_rows

__all__ = ["query_ranks", "ReportResult", "retrieval_report"]

TARGET_COLOR = "#1a9e3a"  # the outline of the target image


def query_ranks(features: EvalFeatures, *, protocol: str = "cirr", remove_reference: bool | None = None) -> dict:
    """Per-query 0-based target ranks: ``{"rank": (Q,) int64, "subset_rank": (Q,) int64 or None}``.

    ``rank`` counts the gallery candidates that beat the target (the reference removed under the CIRR protocol
    unless ``remove_reference`` says otherwise); ``subset_rank`` ranks it among the query's ``img_set`` members
    minus its reference (CIRR). So ``100 * mean(rank < K)`` is R@K and ``100 * mean(subset_rank < K)`` is Rs@K.
    """
    return _ranks(features, protocol_rows(features, protocol=protocol, remove_reference=remove_reference))


def _ranks(features: EvalFeatures, rows, subset: bool = True) -> dict:
    """:func:`query_ranks` from the protocol's rows (``subset=False``: the gallery ranks only)."""
    args = (features.query, features.gallery, rows.target)
    ranks = target_ranks(*args, exclude_rows=rows.exclude, similarity=features.similarity)
    subset_rank = (subset_ranks(*args, rows.subset, exclude_rows=rows.exclude, similarity=features.similarity)
                   if subset and rows.subset is not None else None)
    return {"rank": ranks, "subset_rank": subset_rank}


def _thumbnail(image, side: int):
    from PIL import Image
    image = to_pil(image)
    scale = side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.NEAREST if max(image.size) < side else Image.BICUBIC)  # tiny images stay sharp


def _data_uri(image, side: int) -> str:
    buffer = io.BytesIO()
    _thumbnail(image, side).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class ReportResult:
    """Paths written and the comparison's outcome: ``wins`` / ``losses`` are the query indices where the first model's
    target rank is better / worse (empty without ``compare``); ``shown`` the indices drawn."""

    html: Path
    png: Path
    json: Path
    ranks: list[int]
    compare_ranks: list[int] | None
    wins: list[int]
    losses: list[int]
    shown: list[int]


def _index_top(index, features: EvalFeatures, k: int, remove_reference: bool) -> torch.Tensor:
    """(Q, k) gallery positions of the index's top-k (bank rows mapped through their ids), -1 padded."""
    gallery_pos = {image_id: i for i, image_id in enumerate(features.gallery_ids)}
    missing = [t.reference for t in features.triplets if remove_reference and t.reference not in index]
    if missing:
        raise DataError(explain("the FAISS index's bank lacks reference images of this split", got=missing[:5],
                                fix="export the index from a bank built on this split's gallery"))
    exclude = exclusion_rows(index, features.triplets) if remove_reference else None  # (Q, 1) as in the metrics
    _, rows = index.search(features.query.float(), min(k, len(index)), exclude_rows=exclude)  # (Q, k) bank rows
    top = torch.full((rows.shape[0], k), -1, dtype=torch.int64)
    for q, row_list in enumerate(rows.tolist()):
        found = [g for r in row_list if r >= 0
                 if (g := next((gallery_pos[i] for i in index.ids_of_row(r) if i in gallery_pos), -1)) >= 0][:k]
        top[q, :len(found)] = torch.tensor(found, dtype=torch.int64)
    return top


def _ranking(model, split, features, protocol, remove_reference, k, batch_size, device, show_progress, index=None):
    if features is None:
        features = extract_features(model, split, batch_size=batch_size, device=device, show_progress=show_progress)
    rows = protocol_rows(features, protocol=protocol, remove_reference=remove_reference)
    if index is not None:  # the shown candidates come from the index; the ranks stay exact
        top = _index_top(index, features, k, rows.reference_removed)
    else:
        _, top = topk_rows(features.query, features.gallery, k, exclude_rows=rows.exclude,
                           similarity=features.similarity)  # (Q, k)
    return features, top, _ranks(features, rows, subset=False)["rank"]


def _pick_shown(n: int, ranks: np.ndarray, other: np.ndarray | None, wins: list[int], losses: list[int],
                n_queries: int, queries: Sequence[int] | None, k: int) -> list[int]:
    if queries is not None:
        bad = [q for q in queries if not isinstance(q, (int, np.integer)) or not 0 <= q < n]
        if bad:
            raise ConfigError(explain("query indices out of range", got=bad[:5], expected=f"0..{n - 1}"))
        return [int(q) for q in queries]
    if other is None:  # hits and misses, evenly spread over the split
        order = list(np.argsort(ranks, kind="stable"))
        take = order[: (n_queries + 1) // 2] + order[::-1][: n_queries // 2]
        return sorted(dict.fromkeys(int(q) for q in take))[:n_queries]
    gain = other - ranks  # > 0: the first model ranks the target better
    # first the wins (losses) where the winner's target is among the shown top-k, then by the size of the gap
    by_win = sorted(wins, key=lambda q: (ranks[q] >= k, -gain[q], q))
    by_loss = sorted(losses, key=lambda q: (other[q] >= k, gain[q], q))
    shown = by_win[:max((n_queries + 1) // 2, n_queries - len(by_loss))]  # one side short: the other fills the rest
    return shown + by_loss[: n_queries - len(shown)]


def retrieval_report(model: Any, split: Any, out_dir: str | os.PathLike, *, compare: Any = None,
                     names: Sequence[str] = ("model", "compare"), k: int = 5, n_queries: int = 8,
                     queries: Sequence[int] | None = None, protocol: str | None = None,
                     remove_reference: bool | None = None, images: Any = None, features: EvalFeatures | None = None,
                     compare_features: EvalFeatures | None = None, batch_size: int = 64, device: Any = None,
                     thumbnail: int = 96, title: str | None = None, show_progress: bool = False,
                     index: Any = None) -> ReportResult:
    """Write ``report.html``, ``report.png`` and ``report.json`` into ``out_dir`` (created; see the module doc).

    Args:
        model: a CIR model, or None when ``features`` is given. split: a Split with targets.
        compare: a second model (or None with ``compare_features``) shown beside the first; names: their labels.
        k: candidates shown per query.
        n_queries: queries shown: with ``compare``, half the first model's biggest wins and half its biggest
            losses; without, the best- and worst-ranked queries. queries: explicit query indices instead.
        protocol: "cirr" or "fashioniq" (default: the split's, else "cirr"); remove_reference overrides its removal.
        images: where to read the shown images (default ``split.images``; tensors are min-max scaled).
        features / compare_features: precomputed EvalFeatures of the split (skip the embedding pass).
        thumbnail: side of the page's thumbnails in pixels.
        index: a FaissIndex over a bank of this split's gallery: the first model's shown top-``k`` come from
            searching it (bank rows mapped to gallery images by id); the target ranks stay exact.
    """
    check_positive_int("k", k, fix="e.g. k=5")
    check_positive_int("n_queries", n_queries, fix="e.g. 8")
    if model is None and features is None:
        raise ConfigError(explain("pass a model or its features", fix="retrieval_report(model, split, out_dir)"))
    protocol = protocol or getattr(split, "protocol", None) or "cirr"
    protocol = protocol if protocol in PROTOCOLS else "cirr"
    with_compare = compare is not None or compare_features is not None
    features, top, ranks = _ranking(model, split, features, protocol, remove_reference, k, batch_size, device,
                                    show_progress, index)
    other_top = other_ranks = other_np = None
    if with_compare:
        other_features, other_top, other_ranks = _ranking(compare, split, compare_features, protocol, remove_reference,
                                                          k, batch_size, device, show_progress)
        if other_features.gallery_ids != features.gallery_ids or len(other_features.triplets) != len(features.triplets):
            raise DataError(explain("the two models' features are not of the same split", fix="evaluate one split"))
        other_np = other_ranks.cpu().numpy()
    rank_np = ranks.cpu().numpy()
    wins, losses = ([], []) if other_np is None else (np.flatnonzero(rank_np < other_np).tolist(),
                                                      np.flatnonzero(rank_np > other_np).tolist())
    shown = _pick_shown(len(rank_np), rank_np, other_np, wins, losses, n_queries, queries, k)
    load, ids = pil_loader(images if images is not None else split.images), features.gallery_ids
    label, entries = list(names) + ["compare"] * (2 - len(names)), []
    for q in shown:
        t = features.triplets[q]
        entry = {"query": q, "pair_id": t.pair_id, "reference": t.reference, "text": t.texts[0], "target": t.target,
                 "rank": int(rank_np[q]), "top": [ids[r] for r in top[q].tolist() if r >= 0]}
        if other_np is not None:
            entry.update(compare_rank=int(other_np[q]), compare_top=[ids[r] for r in other_top[q].tolist() if r >= 0],
                         outcome="win" if q in wins else ("loss" if q in losses else "tie"))
        entries.append(entry)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(explain("the report folder is a file", got=str(out),
                                  fix="name a folder (new or existing) for report.html, report.png and report.json"))
    heading = title or f"Top-{k} retrievals: {label[0]}" + (f" vs {label[1]}" if with_compare else "")
    summary = {"title": heading, "protocol": protocol, "k": k, "n_queries": len(rank_np), "names": label[:2],
               "recall_at_k": float((rank_np < k).mean() * 100)}
    if other_np is not None:
        summary.update({"compare_recall_at_k": float((other_np < k).mean() * 100), "wins": len(wins),
                        "losses": len(losses), "ties": len(rank_np) - len(wins) - len(losses)})
    png, page, record = out / "report.png", out / "report.html", out / "report.json"
    other_list = other_np.tolist() if other_np is not None else None
    data = {"summary": summary, "shown": entries, "ranks": rank_np.tolist(), "compare_ranks": other_list, "wins": wins,
            "losses": losses}
    counts = (f"\n{label[0]} ranks the target better on {summary['wins']} of {summary['n_queries']} queries, worse "
              f"on {summary['losses']}, equal on {summary['ties']}" if "wins" in summary else "")  # the PNG says it too
    atomic_write_files({png: _png_bytes(entries, load, label, k, heading + counts, with_compare),
                        page: _html_bytes(entries, load, label, k, heading, summary, wins, losses, features, thumbnail),
                        record: json.dumps(data).encode("utf-8")}, make_parents=True)  # all three or none
    return ReportResult(html=page, png=png, json=record, ranks=rank_np.tolist(), compare_ranks=other_list, wins=wins,
                        losses=losses, shown=shown)


def _rank_text(rank: int) -> str:
    return f"target rank {rank + 1}"


def _png_bytes(entries: list[dict], load, label, k: int, heading: str, with_compare: bool) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    columns, rows = 1 + k + (1 + k if with_compare else 0), max(1, len(entries))
    widths = [1.0] * (1 + k) + ([0.25] + [1.0] * k if with_compare else [])  # a narrow gap between the models
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * sum(widths), 1.45 * rows + 0.7), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax in axes.flat:
        ax.axis("off")
    for r, entry in enumerate(entries):
        ref_ax = axes[r][0]
        ref_ax.imshow(to_pil(load(entry["reference"])), interpolation="nearest")
        ref_ax.set_title("reference", fontsize=6)
        text = entry["text"] if len(entry["text"]) <= 70 else entry["text"][:67] + "..."
        tag = f"  [{entry['outcome']}]" if "outcome" in entry else ""
        ref_ax.text(0.0, -0.12, f"q{entry['query']}{tag}: \"{text}\"", transform=ref_ax.transAxes, fontsize=6,
                    va="top", ha="left", clip_on=False)
        blocks = [(1, entry["top"], entry["rank"], label[0])] + (
            [(2 + k, entry["compare_top"], entry["compare_rank"], label[1])] if with_compare else [])
        for start, top, rank, name in blocks:
            for j, image_id in enumerate(top[:k]):
                ax = axes[r][start + j]
                ax.imshow(to_pil(load(image_id)), interpolation="nearest")
                if j == 0:
                    ax.set_title(f"{name}: {_rank_text(rank)}", fontsize=6, loc="left")
                if image_id == entry["target"]:
                    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=3,
                                           edgecolor=TARGET_COLOR, clip_on=False))
    fig.suptitle(f"{heading} (target outlined in green)", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.04, top=1 - 0.7 / (1.45 * rows + 0.7), wspace=0.08, hspace=0.55)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _html_bytes(entries, load, label, k, heading, summary, wins, losses, features, side) -> bytes:
    esc = html.escape
    cache: dict[str, str] = {}

    def img(image_id: str, target: str | None) -> str:
        if image_id not in cache:
            cache[image_id] = _data_uri(load(image_id), side)
        style = f"border:4px solid {TARGET_COLOR}" if image_id == target else "border:4px solid transparent"
        return (f'<figure><img src="{cache[image_id]}" width="{side}" style="{style}" alt="{esc(image_id)}">'
                f"<figcaption>{esc(image_id)}</figcaption></figure>")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(heading)}</title><style>"
             "body{font-family:sans-serif;margin:1em} figure{display:inline-block;margin:2px;text-align:center}"
             "figcaption{font-size:9px;max-width:110px;overflow-wrap:anywhere} td{vertical-align:top;padding:4px}"
             "tr{border-bottom:1px solid #ccc} .text{font-style:italic} .win{color:#1a9e3a} .loss{color:#c22}"
             "</style></head><body>", f"<h1>{esc(heading)}</h1>"]
    line = (f"{summary['n_queries']} queries, protocol {esc(summary['protocol'])}; R@{k} of {esc(label[0])}: "
            f"{summary['recall_at_k']:.1f}")
    if "wins" in summary:
        line += (f"; of {esc(label[1])}: {summary['compare_recall_at_k']:.1f}. {esc(label[0])} ranks the target "
                 f"better on <b>{summary['wins']}</b> queries, worse on <b>{summary['losses']}</b>, "
                 f"equal on {summary['ties']}.")
    parts.append(f"<p>{line} The target is outlined in green.</p><table>")
    for entry in entries:
        outcome = entry.get("outcome")
        badge = f' <span class="{outcome}">[{outcome}]</span>' if outcome in ("win", "loss") else ""
        cells = [f"<td>query {entry['query']} (pair {esc(str(entry['pair_id']))}){badge}<br>"
                 f"{img(entry['reference'], None)}<br><span class='text'>{esc(entry['text'])}</span></td>",
                 f"<td><b>{esc(label[0])}</b>: {_rank_text(entry['rank'])}<br>"
                 + "".join(img(i, entry["target"]) for i in entry["top"][:k]) + "</td>"]
        if "compare_top" in entry:
            cells.append(f"<td><b>{esc(label[1])}</b>: {_rank_text(entry['compare_rank'])}<br>"
                         + "".join(img(i, entry["target"]) for i in entry["compare_top"][:k]) + "</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if "wins" in summary:
        def listing(name: str, items: list[int]) -> str:
            ids = ", ".join(f"{q} (pair {esc(str(features.triplets[q].pair_id))})" for q in items)
            return f"<details><summary>{esc(name)} ({len(items)})</summary><p>{ids or 'none'}</p></details>"
        parts += [listing(f"queries {label[0]} wins", wins), listing(f"queries {label[0]} loses", losses)]
    parts.append("</body></html>")
    return "\n".join(parts).encode("utf-8")
