"""evaluate(), rank_cirr() and the CIRR submission: closed-form cases, a naive re-implementation, validation."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import cir_plugins as cp
from cir_plugins.data.split import Split
from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import DataError, SubmissionError
from cir_plugins.evaluation import evaluate
from cir_plugins.submission import rank_cirr, submit_cirr, validate_cirr_submission, write_cirr_submission


class TableModel(nn.Module):
    """Fake model: an image tensor holds its own index k; encode_image -> table[k];
    compose_query -> query_table[text index] (texts are "q<i>"). Counts calls, records train mode."""

    def __init__(self, gallery_table, query_table, *, similarity="dot", with_reference=False):
        super().__init__()
        self.gallery_table = torch.as_tensor(gallery_table, dtype=torch.float32)
        self.query_table = torch.as_tensor(query_table, dtype=torch.float32)
        self.similarity = similarity
        self.scale = nn.Parameter(torch.ones(()))
        self.encoded_images = 0
        self.encoded_references = 0
        self.modes = []
        if with_reference:
            self.encode_reference = self._encode_reference

    def encode_image(self, images):
        self.modes.append(self.training)
        self.encoded_images += images.shape[0]
        return self.gallery_table[images[:, 0, 0, 0].long()] * self.scale

    def _encode_reference(self, images):
        self.encoded_references += images.shape[0]
        return images[:, 0, 0, 0].long()  # (B,) reference indices as "features"

    def compose_query(self, reference, texts):
        assert isinstance(reference, torch.Tensor)
        return self.query_table[torch.tensor([int(t[1:]) for t in texts])] * self.scale


def make_split(n_images, queries, protocol="cirr", category=None, text_index=None):
    """queries: list of (ref, target, members) image indices; ids are 'img<k>'; query q's text is
    "q<text_index[q]>" (default "q<q>"), which selects the fake model's query vector."""
    ids = [f"img{k}" for k in range(n_images)]
    images = {i: torch.full((1, 1, 1), float(k)) for k, i in enumerate(ids)}
    text_index = list(range(len(queries))) if text_index is None else text_index
    triplets = [Triplet(ids[r], (f"q{text_index[q]}",), None if t is None else ids[t], pair_id=1000 + q,
                        members=tuple(ids[m] for m in members)) for q, (r, t, members) in enumerate(queries)]
    return Split(dataset=protocol, split="val", triplets=triplets, gallery_ids=ids, images=images,
                 category=category, protocol=protocol)


def default_weights(n):
    return 0.01 + 0.0001 * np.arange(n)  # small, distinct, increasing with the index


def closed_form_world():
    """60 one-hot images; query weights give known target ranks (see each comment)."""
    n = 60
    weights = []
    # Q0: ref 0 scores highest, target 1 next -> rank 0 with the reference removed, 1 if kept
    w = default_weights(n)
    w[0], w[1] = 1.0, 0.9
    weights.append(w)
    # Q1: 7 non-reference images above the target -> rank 7; subset: 12 and 13 above -> subset rank 2
    w = default_weights(n)
    w[10], w[12], w[13] = 1.0, 0.9, 0.85
    w[40:45] = [0.8, 0.75, 0.7, 0.65, 0.6]
    w[11] = 0.5
    weights.append(w)
    # Q2: target below 51 non-reference images (52 with the reference); subset members below it -> subset rank 0
    w = default_weights(n)
    w[21] = 0.005
    w[56:59] = [0.001, 0.002, 0.003]
    w[22:26] = [1e-4, 2e-4, 3e-4, 4e-4]
    weights.append(w)
    # Q3: 51, 50, 32 above the target; reference low -> rank 3; subset: 32 above -> subset rank 1
    w = default_weights(n)
    w[30], w[31], w[32], w[50], w[51] = 0.5, 0.9, 0.95, 0.97, 0.99
    weights.append(w)
    # Q4: reference highest, 9 others above the target -> rank 9 removed, 10 kept
    w = default_weights(n)
    w[45], w[46] = 1.0, 0.5
    w[47:56] = np.linspace(0.6, 0.9, 9)
    weights.append(w)
    queries = [(0, 1, [0, 1, 2, 3, 4, 5]), (10, 11, [10, 11, 12, 13, 14, 15]), (20, 21, [20, 21, 22, 23, 24, 25]),
               (30, 31, [30, 31, 32, 33, 34, 35]), (45, 46, [45, 46, 47, 48, 49, 52])]
    return np.eye(n), np.stack(weights), queries


def test_cirr_closed_form():
    gallery, weights, queries = closed_form_world()
    model = TableModel(gallery, weights[:4])
    split = make_split(60, queries[:4])
    result = evaluate(model, split, show_progress=False)
    # ranks (reference removed): 0, 7, 51, 3; subset ranks: 0, 2, 0, 1
    expected = {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "R@50": 75.0, "Rs@1": 50.0, "Rs@2": 75.0, "Rs@3": 100.0,
                "Rmean": 50.0}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["protocol"]["name"] == "cirr" and result["protocol"]["reference_removed"] is True
    assert result["n_queries"] == 4 and result["n_gallery"] == 60
    kept = evaluate(model, split, show_progress=False, remove_reference=False)
    assert kept["R@1"] == 0.0 and kept["R@5"] == 50.0 and kept["protocol"]["reference_removed"] is False


def test_fashioniq_closed_form_reference_option_and_average():
    gallery, weights, queries = closed_form_world()
    picked = [0, 1, 2, 4]
    model = TableModel(gallery, weights[picked])
    split = make_split(60, [queries[i] for i in picked], protocol="fashioniq", category="dress")
    kept = evaluate(model, split, show_progress=False)
    # reference kept (standard): ranks 1, 8, 52, 10
    assert kept["R@10"] == 50.0 and kept["R@50"] == 75.0 and "Rs@1" not in kept
    assert kept["protocol"] == {**kept["protocol"], "name": "fashioniq", "reference_removed": False}
    removed = evaluate(model, split, show_progress=False, remove_reference=True)
    # reference removed: ranks 0, 7, 51, 9
    assert removed["R@10"] == 75.0 and removed["R@50"] == 75.0 and removed["protocol"]["reference_removed"] is True
    # three categories: per category, averages and Rmean
    shirt = make_split(60, [queries[i] for i in (0, 1)], protocol="fashioniq", category="shirt")  # ranks 1, 8
    toptee = make_split(60, [queries[2]], protocol="fashioniq", category="toptee", text_index=[2])  # rank 52
    model3 = TableModel(gallery, weights[picked])  # query "q<i>" indexes the weights of picked[i]
    out = evaluate(model3, [split, shirt, toptee], show_progress=False)
    assert out["dress"]["R@10"] == 50.0 and out["shirt"]["R@10"] == 100.0 and out["toptee"]["R@10"] == 0.0
    assert out["Avg R@10"] == pytest.approx(50.0)
    assert out["Avg R@50"] == pytest.approx((75.0 + 100.0 + 0.0) / 3)
    assert out["Rmean"] == pytest.approx((50.0 + 175.0 / 3) / 2)
    assert out["protocol"]["categories"] == ["dress", "shirt", "toptee"]


def test_features_once_per_image_and_mode_restored():
    gallery, weights, queries = closed_form_world()
    model = TableModel(gallery, weights[:4], with_reference=True)
    split = make_split(60, queries[:4] + [queries[0]])  # reference img0 used twice
    split.triplets[-1] = Triplet("img0", ("q0",), "img1", pair_id=9, members=split.triplets[0].members)
    model.train()
    result = evaluate(model, split, batch_size=7, show_progress=False)
    assert model.encoded_images == 60  # one pass over the gallery only
    assert model.encoded_references == 4  # once per distinct reference id
    assert model.modes and not any(model.modes) and model.training is True
    assert result["R@1"] == pytest.approx(40.0)


# ---------------------------------------------------------------- independent naive re-implementation


def naive_metrics(query, gallery, triplets, ids, *, remove_reference, subset, max_token=False):
    """Plain numpy/python: cosine scores, sort best first (ties to lower index), find the target."""
    q = query / np.linalg.norm(query, axis=-1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=-1, keepdims=True)
    row = {i: k for k, i in enumerate(ids)}
    ranks, s_ranks = [], []
    for qi, t in enumerate(triplets):
        scores = [(g[k] @ q[qi]).max() if max_token else float(g[k] @ q[qi]) for k in range(len(ids))]
        candidates = [k for k in range(len(ids)) if not (remove_reference and k == row[t.reference])]
        order = sorted(candidates, key=lambda k: (-scores[k], k))
        ranks.append(order.index(row[t.target]))
        if subset:
            members = [row[m] for m in t.members if m != t.reference]
            s_order = sorted(members, key=lambda k: (-scores[k], k))
            s_ranks.append(s_order.index(row[t.target]))
    out = {}
    ks = (1, 5, 10, 50) if subset else (10, 50)
    for k in ks:
        out[f"R@{k}"] = 100.0 * np.mean([r < k for r in ranks])
    if subset:
        for k in (1, 2, 3):
            out[f"Rs@{k}"] = 100.0 * np.mean([r < k for r in s_ranks])
        out["Rmean"] = (out["R@5"] + out["Rs@1"]) / 2
    return out, ranks


def random_world(seed, n=71, n_queries=13, dim=7, tokens=None):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(n, tokens, dim) if tokens else (n, dim))
    query = rng.normal(size=(n_queries, dim))
    queries = []
    for _ in range(n_queries):
        members = list(rng.choice(n, 6, replace=False))
        queries.append((members[0], members[int(rng.integers(1, 6))], members))
    return gallery, query, queries


@pytest.mark.parametrize("seed,tokens", [(0, None), (1, None), (2, 3), (3, 5)])
def test_cirr_agrees_with_naive(seed, tokens):
    gallery, query, queries = random_world(seed, tokens=tokens)
    model = TableModel(gallery, query, similarity="max_token" if tokens else "dot")
    split = make_split(len(gallery), queries)
    got = evaluate(model, split, batch_size=5, show_progress=False)
    want, _ = naive_metrics(query, gallery, split.triplets, split.gallery_ids, remove_reference=True, subset=True,
                            max_token=bool(tokens))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    # the submission ranking agrees with the naive order too
    ranking = rank_cirr(model, split, show_progress=False)
    q = query / np.linalg.norm(query, axis=-1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=-1, keepdims=True)
    for qi, t in enumerate(split.triplets):
        scores = [(g[k] @ q[qi]).max() if tokens else float(g[k] @ q[qi]) for k in range(len(gallery))]
        ref = split.gallery_ids.index(t.reference)
        order = sorted((k for k in range(len(gallery)) if k != ref), key=lambda k: (-scores[k], k))
        assert ranking.recall_names[qi] == [split.gallery_ids[k] for k in order[:50]]
        members = [split.gallery_ids.index(m) for m in t.members if m != t.reference]
        assert ranking.subset_names[qi] == [
            split.gallery_ids[k] for k in sorted(members, key=lambda k: (-scores[k], k))[:3]
        ]


@pytest.mark.parametrize("seed,remove", [(4, False), (5, True)])
def test_fashioniq_agrees_with_naive(seed, remove):
    gallery, query, queries = random_world(seed, n=53, n_queries=17, dim=5)
    model = TableModel(gallery, query)
    split = make_split(len(gallery), queries, protocol="fashioniq", category="shirt")
    got = evaluate(model, split, show_progress=False, remove_reference=remove)
    want, _ = naive_metrics(query, gallery, split.triplets, split.gallery_ids, remove_reference=remove, subset=False)
    assert got["R@10"] == pytest.approx(want["R@10"]) and got["R@50"] == pytest.approx(want["R@50"])


def test_evaluate_errors():
    gallery, weights, queries = closed_form_world()
    model = TableModel(gallery, weights[:1])
    with pytest.raises(DataError, match="without targets"):
        evaluate(model, make_split(60, [(0, None, [0, 1, 2, 3, 4, 5])]), show_progress=False)
    bad = make_split(60, [(0, 1, [0, 1, 2])])
    bad.gallery_ids = bad.gallery_ids[2:]
    with pytest.raises(DataError, match="not in the gallery"):
        evaluate(model, bad, show_progress=False)
    with pytest.raises(cp.errors.ConfigError):
        evaluate(model, make_split(60, [(0, 1, [0, 1])]), protocol="recall", show_progress=False)


# ---------------------------------------------------------------------------------------- submission


def submission_case():
    gallery, query, queries = random_world(7, n=60, n_queries=4)
    queries = [(r, None, m) for r, _, m in queries]
    split = make_split(60, queries)
    ranking = rank_cirr(TableModel(gallery, query), split, show_progress=False)
    return split, ranking


def test_write_submission_valid(tmp_path):
    split, ranking = submission_case()
    path_r, path_s = write_cirr_submission(tmp_path, ranking.pair_ids, ranking.recall_names, ranking.subset_names,
                                           split=split)
    recall, subset = json.loads(path_r.read_text()), json.loads(path_s.read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert sorted(k for k in recall if k not in ("version", "metric")) == sorted(str(p) for p in ranking.pair_ids)
    assert all(len(v) == 50 for k, v in recall.items() if k not in ("version", "metric"))
    assert all(len(v) == 3 for k, v in subset.items() if k not in ("version", "metric"))
    assert not list(tmp_path.glob("*.tmp-*"))


def _mutations(split, ranking):
    p, r, s = list(ranking.pair_ids), [list(x) for x in ranking.recall_names], [list(x) for x in ranking.subset_names]
    t0 = split.triplets[0]
    outside_group = next(i for i in split.gallery_ids if i not in t0.members)
    yield "missing pair", (p[1:], r[1:], s[1:])
    yield "duplicate pair", (p + p[:1], r + r[:1], s + s[:1])
    yield "extra pair", (p[:-1] + [99999], r, s)
    yield "pair id not int", (["1000"] + p[1:], r, s)
    yield "49 names", (p, [r[0][:49]] + r[1:], s)
    yield "51 names", (p, [r[0] + [r[1][0] if r[1][0] not in r[0] else outside_group]] + r[1:], s)
    yield "duplicate name", (p, [r[0][:49] + r[0][:1]] + r[1:], s)
    yield "reference in recall", (p, [r[0][:49] + [t0.reference]] + r[1:], s)
    yield "reference in subset", (p, r, [s[0][:2] + [t0.reference]] + s[1:])
    yield "subset outside group", (p, r, [s[0][:2] + [outside_group]] + s[1:])
    yield "two subset names", (p, r, [s[0][:2]] + s[1:])
    yield "unknown name", (p, [r[0][:49] + ["not-an-image"]] + r[1:], s)
    yield "extension", (p, [r[0][:49] + [r[0][49] + ".png"]] + r[1:], s)
    yield "length mismatch", (p, r[:-1], s)
    yield "names not list", (p, ["abc"] + r[1:], s)


def test_submission_validator_rejects_each_malformed_case(tmp_path):
    split, ranking = submission_case()
    cases = list(_mutations(split, ranking))
    assert len(cases) == 15
    for label, (p, r, s) in cases:
        with pytest.raises(SubmissionError):
            write_cirr_submission(tmp_path / label.replace(" ", "_"), p, r, s, split=split)
        assert not (tmp_path / label.replace(" ", "_")).exists(), label  # nothing written
    validate_cirr_submission(ranking.pair_ids, ranking.recall_names, ranking.subset_names, split=split)


def test_submit_cirr_on_fixture_tree(tmp_path):
    from cir_plugins.data.fixtures import build_cirr_tree

    root = build_cirr_tree(tmp_path / "cirr", n_images=56, n_triplets=5, splits=("test1",))
    split = cp.load_cirr(root, "test1", size=8)

    class PixelModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, 6)

        def encode_image(self, images):
            return self.proj(images.flatten(1))  # (N, 3*8*8) -> (N, 6)

        def compose_query(self, reference, texts):
            return self.encode_image(reference) + torch.tensor([[len(t) % 7 / 7.0] * 6 for t in texts])

    path_r, path_s = submit_cirr(PixelModel(), split, tmp_path / "out", show_progress=False)
    recall = json.loads(path_r.read_text())
    assert set(recall) - {"version", "metric"} == {str(t.pair_id) for t in split.triplets}


# ---------------------------------------------------------------------------------------- command line

FACTORY = '''
import torch
from torch import nn


class PixelModel(nn.Module):
    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, dim)

    def encode_image(self, images):
        return self.proj(images.mean(dim=(2, 3)))  # (N, 3, H, W) -> (N, 3) -> (N, dim)

    def compose_query(self, reference, texts):
        return self.encode_image(reference) + 0.01 * torch.tensor([[float(len(t))] for t in texts])


def build(dim=4):
    return PixelModel(dim)
'''


def _run(configure, run, argv):
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    return run(parser.parse_args(argv))


def test_command_line_evaluate_and_submit(tmp_path, capsys):
    from cir_plugins.cli.evaluate import configure_evaluate, configure_submit, run_evaluate, run_submit
    from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree

    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    cirr = build_cirr_tree(tmp_path / "cirr", n_images=56, n_triplets=3, splits=("val", "test1"))
    common = ["--model", f"{factory}:build", "--factory-kwargs", '{"dim": 5}', "--image-size", "8", "--no-progress"]
    out = tmp_path / "result.json"
    assert _run(configure_evaluate, run_evaluate,
                common + ["--root", str(cirr), "--dataset", "cirr", "--split", "val", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean"}
    assert result["protocol"]["reference_removed"] is True
    assert "Rmean" in capsys.readouterr().out
    fiq = build_fashioniq_tree(tmp_path / "fiq", n_images=12, splits=("val",))
    assert _run(configure_evaluate, run_evaluate,
                common + ["--root", str(fiq), "--dataset", "fashioniq", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"dress", "shirt", "toptee", "Avg R@10", "Avg R@50", "Rmean"}
    assert result["protocol"]["reference_removed"] is False
    assert _run(configure_submit, run_submit, common + ["--root", str(cirr), "--out-dir", str(tmp_path / "sub")]) == 0
    assert (tmp_path / "sub" / "recall_submission_cirr.json").is_file()
    assert (tmp_path / "sub" / "recall_subset_submission_cirr.json").is_file()
    with pytest.raises(cp.errors.ConfigError):
        _run(configure_evaluate, run_evaluate, common + ["--root", str(cirr), "--dataset", "cirr",
                                                         "--factory-kwargs", "[1]"])


def test_structured_reference_features_are_encoded_per_batch():
    gallery, weights, queries = closed_form_world()

    class DictReference(TableModel):
        def encode_reference(self, images):
            self.encoded_references += images.shape[0]
            return {"index": images[:, 0, 0, 0].long()}  # not a tensor: cannot be cached by row

        def compose_query(self, reference, texts):
            assert isinstance(reference, dict) and reference["index"].shape[0] == len(texts)
            return super().compose_query(reference["index"], texts)

    model = DictReference(gallery, weights[:4])
    result = evaluate(model, make_split(60, queries[:4]), batch_size=3, show_progress=False)
    assert result["R@1"] == 25.0 and result["Rmean"] == 50.0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gallery, query, queries = random_world(11, tokens=3)
    model = TableModel(gallery, query, similarity="max_token")
    split = make_split(len(gallery), queries)
    on_cpu = evaluate(model, split, show_progress=False)
    model.gallery_table, model.query_table = model.gallery_table.cuda(), model.query_table.cuda()
    model.cuda()
    split.images = {k: v.cuda() for k, v in split.images.items()}
    on_gpu = evaluate(model, split, show_progress=False)
    assert {k: v for k, v in on_gpu.items() if k != "protocol"} == {k: v for k, v in on_cpu.items() if k != "protocol"}
