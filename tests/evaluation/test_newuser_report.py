"""The retrieval picture states the overall count of queries the first model ranks better and worse, as the HTML
page does (not only the few queries it shows)."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from test_report import _Lookup, _random_features

from cir_plugins.data.split import Split
from cir_plugins.report import retrieval_report


def test_the_png_shows_the_better_and_worse_counts(tmp_path, monkeypatch):
    titles = []
    original = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **kw: titles.append(text) or original(self, text, **kw))
    features = _random_features(seed=1)
    images = {image_id: torch.full((3, 8, 8), float(i)) for i, image_id in enumerate(features.gallery_ids)}
    split = Split(dataset="synthetic", split="test", triplets=features.triplets, gallery_ids=features.gallery_ids,
                  images=images, protocol="cirr")
    g = torch.Generator().manual_seed(2)
    first = _Lookup(torch.randn(len(features.gallery_ids), 6, generator=g), torch.randn(len(features.triplets), 6,
                                                                                         generator=g))
    second = _Lookup(first.table.detach().clone(), torch.randn(len(features.triplets), 6, generator=g))
    result = retrieval_report(first, split, tmp_path / "r", compare=second, names=("ours", "base"), k=5, n_queries=4)
    wins, losses = len(result.wins), len(result.losses)
    ties = len(features.triplets) - wins - losses
    (title,) = titles
    assert (f"ours ranks the target better on {wins} of {len(features.triplets)} queries, worse on {losses}, "
            f"equal on {ties}") in title
    html = result.html.read_text()
    assert f"better on <b>{wins}</b> queries, worse on <b>{losses}</b>" in html  # the same numbers as the page
    titles.clear()
    retrieval_report(first, split, tmp_path / "one", k=5, n_queries=2)  # one model: nothing to count
    assert "ranks the target better" not in titles[0]
