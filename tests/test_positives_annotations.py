import json
import shutil

import pytest

import cir_plugins as cp
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import AnnotationError, ConfigError
from cir_plugins.positives.annotations import (read_generated_cirr, read_generated_fashioniq, write_generated_cirr,
                                               write_generated_fashioniq)


def generated(ids, n_texts=2):
    out = []
    for k in range(len(ids) - 1):
        texts = [f"text {j} for {ids[k]} -> {ids[k + 1]} {{braces}} é" for j in range(n_texts)]
        out.append(cp.Triplet(ids[k], texts, ids[k + 1], source="generated",
                              meta={"reference_caption": f"cap {ids[k]}", "target_caption": f"cap {ids[k + 1]}",
                                    "templates": ["{target} instead of {reference}"] * n_texts, "seed": 3}))
    return out


def _key(t):
    return (t.reference, t.texts, t.target, t.source, t.meta.get("reference_caption"), t.meta.get("target_caption"),
            tuple(t.meta.get("templates", ())))


def test_cirr_round_trip_and_loader_reads_it(tmp_path):
    root = build_cirr_tree(tmp_path / "cirr_root", splits=("train",))
    train = cp.load_cirr(root, "train")
    triplets = generated(list(train.gallery_ids)[:7])
    out = root / "cirr" / "captions" / "cap.rc2.gen.json"
    write_generated_cirr(triplets, out, first_pair_id=1000)
    assert not list(out.parent.glob("*.tmp-*"))
    back = read_generated_cirr(out)
    assert [_key(t) for t in back] == [_key(t) for t in triplets]
    assert [t.pair_id for t in back] == list(range(1000, 1006))
    record = json.loads(out.read_text())[0]
    assert record["source"] == "generated" and record["caption"] == triplets[0].texts[0]
    assert record["img_set"]["members"] == [triplets[0].reference, triplets[0].target]
    shutil.copy(root / "cirr" / "image_splits" / "split.rc2.train.json",
                root / "cirr" / "image_splits" / "split.rc2.gen.json")
    loaded = cp.load_cirr(root, "gen")
    assert [(t.reference, t.target, t.texts[0]) for t in loaded.triplets] == \
        [(t.reference, t.target, t.texts[0]) for t in triplets]


def test_fashioniq_round_trip_and_loader_reads_it(tmp_path):
    root = build_fashioniq_tree(tmp_path / "fiq_root", categories=("dress",), splits=("train",))
    train = cp.load_fashioniq(root, "dress", "train")
    for n_texts in (1, 2, 3):
        triplets = generated(list(train.gallery_ids)[:5], n_texts)
        out = root / "captions" / "cap.dress.gen.json"
        write_generated_fashioniq(triplets, out)
        back = read_generated_fashioniq(out)
        assert [_key(t) for t in back] == [_key(t) for t in triplets]
        shutil.copy(root / "image_splits" / "split.dress.train.json", root / "image_splits" / "split.dress.gen.json")
        loaded = cp.load_fashioniq(root, "dress", "gen")
        assert [(t.reference, t.target) for t in loaded.triplets] == [(t.reference, t.target) for t in triplets]


def test_errors(tmp_path):
    with pytest.raises(ConfigError):
        write_generated_cirr([cp.Triplet("a", ["x"], None)], tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"reference": "a", "target_hard": "b", "captions": []}]')
    with pytest.raises(AnnotationError, match="record 0"):
        read_generated_cirr(bad)
    bad.write_text('{"not": "a list"}')
    with pytest.raises(AnnotationError):
        read_generated_fashioniq(bad)
    bad.write_text('[{"candidate": "a", "target": "b", "captions"')
    with pytest.raises(AnnotationError):
        read_generated_fashioniq(bad)
