"""Per-query ranks against a plain sort, the retrieval report's files, and `cir-plugins show` on CIRR, FashionIQ
and the synthetic world."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _toy import factory_source

from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.data.split import Split
from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import ConfigError
from cir_plugins.evaluation import EvalFeatures, metrics_from_features
from cir_plugins.report import query_ranks, retrieval_report


def _random_features(n_gallery=30, n_queries=25, dim=6, seed=0) -> EvalFeatures:
    g = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(n_gallery, dim, generator=g), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=-1)
    gallery[7] = gallery[3]  # an exact tie: the lower row wins it
    ids = [f"g{i}" for i in range(n_gallery)]
    triplets = []
    for q in range(n_queries):
        members = [ids[i] for i in torch.randperm(n_gallery, generator=g)[:6].tolist()]
        triplets.append(Triplet(members[0], (f"text {q}",), members[1], members=tuple(members), pair_id=q))
    return EvalFeatures(query=query, gallery=gallery, gallery_ids=ids, triplets=triplets, similarity="dot")


def _plain_rank(scores: list[float], target: int, candidates: list[int]) -> int:
    """The target's 0-based position in the candidates sorted by score (descending), ties to the lower row."""
    order = sorted(candidates, key=lambda r: (-scores[r], r))
    return order.index(target)


def test_query_ranks_match_a_plain_sort_and_the_metrics():
    features = _random_features()
    ranks = query_ranks(features, protocol="cirr")
    row = features.row_of
    for q, t in enumerate(features.triplets):
        scores = (features.gallery @ features.query[q]).tolist()
        everyone = [r for r in range(len(scores)) if r != row[t.reference]]  # CIRR: the reference removed
        assert ranks["rank"][q] == _plain_rank(scores, row[t.target], everyone)
        members = [row[m] for m in t.members if m != t.reference]
        assert ranks["subset_rank"][q] == _plain_rank(scores, row[t.target], members)
    metrics = metrics_from_features(features, protocol="cirr")
    assert float((ranks["rank"] < 5).double().mean() * 100) == pytest.approx(metrics["R@5"])
    assert float((ranks["subset_rank"] < 1).double().mean() * 100) == pytest.approx(metrics["Rs@1"])
    kept = query_ranks(features, protocol="fashioniq")  # FashionIQ keeps the reference as a candidate
    assert kept["subset_rank"] is None and bool((kept["rank"] >= ranks["rank"]).all())


class _Lookup(torch.nn.Module):
    """A model whose image embedding is a fixed row per image (read from the pixel tensor's first value)."""

    similarity = "dot"

    def __init__(self, table: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.table, self.shift = torch.nn.Parameter(table), shift

    def encode_image(self, pixels):
        return self.table[pixels[:, 0, 0, 0].long()]

    def compose_query(self, reference, texts):  # reference: raw pixels (no encode_reference)
        return self.encode_image(reference) + self.shift[[int(t.split()[-1]) for t in texts]]


def test_retrieval_report_compares_two_models_and_writes_self_contained_files(tmp_path):
    features = _random_features(seed=1)
    n = len(features.gallery_ids)
    images = {image_id: torch.full((3, 8, 8), float(i)) for i, image_id in enumerate(features.gallery_ids)}
    split = Split(dataset="synthetic", split="test", triplets=features.triplets, gallery_ids=features.gallery_ids,
                  images=images, protocol="cirr")
    g = torch.Generator().manual_seed(2)
    good = _Lookup(torch.randn(n, 6, generator=g), torch.zeros(len(features.triplets), 6))
    with torch.no_grad():  # the good model's query is close to its target's row
        for q, t in enumerate(features.triplets):
            good.shift[q] = good.table[features.row_of[t.target]] * 3 - good.table[features.row_of[t.reference]]
    bad = _Lookup(good.table.detach().clone(), torch.randn(len(features.triplets), 6, generator=g))
    result = retrieval_report(good, split, tmp_path / "r", compare=bad, names=("good", "bad"), k=5, n_queries=4)
    assert result.wins and len(result.wins) > len(result.losses)
    assert all(result.ranks[q] < result.compare_ranks[q] for q in result.wins)
    assert all(result.ranks[q] > result.compare_ranks[q] for q in result.losses)
    assert len(result.shown) == 4 and set(result.shown[:2]) <= set(result.wins)
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = result.html.read_text()
    assert 'src="http' not in page and page.count("data:image/png;base64,") >= 5 and "good" in page
    record = json.loads(result.json.read_text())
    assert record["summary"]["wins"] == len(result.wins) and len(record["ranks"]) == len(features.triplets)
    for entry in record["shown"]:
        assert len(entry["top"]) == 5 and entry["reference"] not in entry["top"]  # CIRR removes the reference
        assert (entry["target"] in entry["top"]) == (entry["rank"] < 5)
    single = retrieval_report(good, split, tmp_path / "one", k=3, queries=[0, 2])
    assert single.shown == [0, 2] and single.compare_ranks is None and not single.wins
    with pytest.raises(ConfigError):
        retrieval_report(good, split, tmp_path / "x", queries=[999])
    with pytest.raises(ConfigError):
        retrieval_report(good, split, tmp_path / "x", k=0)


def _show(argv) -> int:
    from cir_plugins.cli import show

    parser = argparse.ArgumentParser(prog="cir-plugins show")
    show.configure(parser)
    return show.run(parser.parse_args(argv))


@pytest.fixture()
def factory(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(factory_source())
    return path


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq", "synthetic"])
def test_show_writes_the_report_for_each_dataset(dataset, factory, tmp_path, capsys):
    if dataset == "cirr":
        root = build_cirr_tree(tmp_path / "data", n_images=12, n_triplets=6, splits=("val",))
        extra = []
    elif dataset == "fashioniq":
        root = build_fashioniq_tree(tmp_path / "data", n_images=10, n_triplets=5)
        extra = ["--category", "dress"]
    else:
        from cir_plugins.data.synthetic import make_world

        root = make_world(tmp_path / "data", seed=1, size=dict(n_train_triplets=2, n_train_unlabelled=2,
                                                              n_val_queries=5, n_val_distractors=4,
                                                              n_test_queries=1, n_test_distractors=0))
        extra = []
    out = tmp_path / "show"
    argv = ["--model", f"{factory}:build", "--dataset", dataset, "--root", str(root), "--split", "val",
            "--image-size", "4", "--out", str(out), "--k", "3", "--queries", "2", "--no-progress", *extra]
    assert _show(argv + ["--compare", f"{factory}:build", "--factory-kwargs", '{"seed": 0}']) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "better than" in printed
    record = json.loads((out / "report.json").read_text())
    assert record["summary"]["protocol"] == ("fashioniq" if dataset == "fashioniq" else "cirr")
    # the same model on both sides: no query is won or lost
    assert record["wins"] == [] and record["losses"] == []
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "report.html").is_file()


def test_show_refuses_fashioniq_without_a_category(factory, tmp_path):
    root = build_fashioniq_tree(tmp_path / "data", n_images=10, n_triplets=5)
    with pytest.raises(ConfigError, match="category"):
        _show(["--model", f"{factory}:build", "--dataset", "fashioniq", "--root", str(root), "--split", "val",
               "--image-size", "4", "--out", str(tmp_path / "o")])


def test_report_shows_a_flat_faiss_index_top_k_equal_to_the_exact_one(tmp_path):
    pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')
    from types import SimpleNamespace

    from cir_plugins.negatives.faiss_index import build_faiss_index

    features = _random_features(seed=3)
    images = {image_id: torch.zeros(3, 4, 4) for image_id in features.gallery_ids}
    split = Split(dataset="synthetic", split="test", triplets=features.triplets, gallery_ids=features.gallery_ids,
                  images=images, protocol="cirr")
    # a bank in another row order than the gallery: the report must map bank rows to gallery images by id
    order = list(reversed(range(len(features.gallery_ids))))
    bank_ids = [features.gallery_ids[i] for i in order]
    bank = SimpleNamespace(embeddings=features.gallery[order], ids=bank_ids, row_of=bank_ids.index, fingerprint="f")
    index = build_faiss_index(bank, "flat")
    queries = list(range(len(features.triplets)))
    exact = retrieval_report(None, split, tmp_path / "exact", features=features, k=5, queries=queries)
    searched = retrieval_report(None, split, tmp_path / "faiss", features=features, k=5, queries=queries, index=index)
    shown_exact = json.loads(exact.json.read_text())["shown"]
    shown_faiss = json.loads(searched.json.read_text())["shown"]
    tied = {features.gallery_ids[3], features.gallery_ids[7]}  # identical rows: either order is a correct top-k
    for a, b in zip(shown_exact, shown_faiss):
        assert b["reference"] not in b["top"] and len(b["top"]) == 5
        if tied & set(a["top"]):
            assert set(a["top"]) - tied == set(b["top"]) - tied
        else:
            assert a["top"] == b["top"]
    assert searched.ranks == exact.ranks  # ranks stay exact
