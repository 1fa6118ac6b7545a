import json
import shutil

import pytest

import cir_plugins as cp
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import AnnotationError, ConfigError
from cir_plugins.positives.annotations import read_generated, write_generated_cirr, write_generated_fashioniq


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
    back = read_generated(out)
    assert [_key(t) for t in back] == [_key(t) for t in triplets]
    assert [t.pair_id for t in back] == list(range(1000, 1006))
    record = json.loads(out.read_text())[0]
    assert record["source"] == "generated" and record["caption"] == triplets[0].texts[0]
    assert record["img_set"]["members"] == [triplets[0].reference, triplets[0].target]
    shutil.copy(root / "cirr" / "image_splits" / "split.rc2.train.json",
                root / "cirr" / "image_splits" / "split.rc2.gen.json")
    loaded = cp.load_cirr(root, "gen", set_size=None)  # a generated pair has no 6-image set
    assert [(t.reference, t.target, t.texts[0]) for t in loaded.triplets] == \
        [(t.reference, t.target, t.texts[0]) for t in triplets]


def test_fashioniq_round_trip_and_loader_reads_it(tmp_path):
    root = build_fashioniq_tree(tmp_path / "fiq_root", categories=("dress",), splits=("train",))
    train = cp.load_fashioniq(root, "dress", "train")
    for n_texts in (1, 2, 3):
        triplets = generated(list(train.gallery_ids)[:5], n_texts)
        out = root / "captions" / "cap.dress.gen.json"
        write_generated_fashioniq(triplets, out)
        back = read_generated(out)
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
        read_generated(bad)
    bad.write_text('{"not": "a list"}')
    with pytest.raises(AnnotationError):
        read_generated(bad)
    bad.write_text('[{"candidate": "a", "target": "b", "captions"')
    with pytest.raises(AnnotationError):
        read_generated(bad)


# ------------------------------------------------------------------------------------------------
# the method's release files, in their exact published shapes (docs/method.md section 2)


def _release_cirr_records(ids):
    """cap.rc2.train.extend_{model}.json: caption is a LIST of texts, pairid 0, img_set has only members,
    caption1 / caption2 are the reference / target captions; no source field."""
    return [{"target_hard": ids[k + 1], "reference": ids[k],
             "caption": [f"a red {k} instead of a blue {k}", f"Unlike a blue {k}, I want a red {k}"],
             "pairid": 0, "img_set": {"members": [ids[k], ids[k + 1]]},
             "caption1": f"a blue {k}", "caption2": f"a red {k}"} for k in range(len(ids) - 1)]


def _release_fashioniq_records(ids):
    """cap.extend_{model}.train.json: captions is a list of texts ("{T}" template: one), no source field."""
    return [{"target": ids[k + 1], "candidate": ids[k], "captions": [f"long red dress {k}"],
             "caption1": f"short blue dress {k}", "caption2": f"long red dress {k}"} for k in range(len(ids) - 1)]


def test_release_cirr_file_loads_as_generated_triplets(tmp_path):
    ids = [f"train-{k}-0-img0" for k in range(5)]
    path = tmp_path / "cap.rc2.train.extend_clip.json"
    path.write_text(json.dumps(_release_cirr_records(ids)))
    back = read_generated(path)
    assert len(back) == 4
    for k, t in enumerate(back):
        assert (t.reference, t.target, t.source) == (ids[k], ids[k + 1], "generated")
        assert t.texts == (f"a red {k} instead of a blue {k}", f"Unlike a blue {k}, I want a red {k}")
        assert t.members == (ids[k], ids[k + 1])
        assert (t.meta["reference_caption"], t.meta["target_caption"]) == (f"a blue {k}", f"a red {k}")


def test_release_fashioniq_file_loads_as_generated_triplets(tmp_path):
    ids = [f"B00{k}" for k in range(4)]
    path = tmp_path / "cap.extend_clip.train.json"
    path.write_text(json.dumps(_release_fashioniq_records(ids)))
    back = read_generated(path)
    assert [(t.reference, t.target, t.texts, t.source) for t in back] == \
        [(ids[k], ids[k + 1], (f"long red dress {k}",), "generated") for k in range(3)]
    assert back[0].meta["reference_caption"] == "short blue dress 0"


def test_generated_readers_keep_an_explicit_source_and_refuse_an_unknown_one(tmp_path):
    ids = [f"B00{k}" for k in range(3)]
    records = _release_fashioniq_records(ids)
    records[0]["source"] = "annotated"
    path = tmp_path / "gen.json"
    path.write_text(json.dumps(records))
    assert [t.source for t in read_generated(path)] == ["annotated", "generated"]
    records[1]["source"] = "llm"
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match="record 1.*source"):
        read_generated(path)


def test_stage2_reads_the_release_files_by_their_keys(tmp_path):
    from cir_plugins.positives.annotations import read_generated

    ids = [f"train-{k}-0-img0" for k in range(3)]
    path = tmp_path / "cirr.json"
    path.write_text(json.dumps(_release_cirr_records(ids)))
    assert [t.source for t in read_generated(path)] == ["generated", "generated"]
    path.write_text(json.dumps(_release_fashioniq_records(ids)))
    assert [t.texts for t in read_generated(path)] == [("long red dress 0",), ("long red dress 1",)]
