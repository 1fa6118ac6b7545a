"""CIRR and FashionIQ loaders on fixture trees with the real files' quirks, plus property tests."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cir_plugins as cp
from cir_plugins.data.cirr import cirr_splits, load_cirr
from cir_plugins.data.fashioniq import fashioniq_text, load_fashioniq, load_split
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import AnnotationError, ConfigError, UnsafePathError


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return build_cirr_tree(tmp_path_factory.mktemp("cirr"))


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    return build_fashioniq_tree(tmp_path_factory.mktemp("fiq"))


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- CIRR


def test_cirr_train_keeps_every_field(cirr_root):
    split = cp.load_cirr(cirr_root, "train", size=8)
    records = json.loads((cirr_root / "cirr/captions/cap.rc2.train.json").read_text())
    paths = json.loads((cirr_root / "cirr/image_splits/split.rc2.train.json").read_text())
    assert split.dataset == "cirr" and split.protocol == "cirr" and split.split == "train"
    assert split.gallery_ids == list(paths)
    assert isinstance(split.images, cp.ImageStore) and split.images.ids == list(paths)
    assert len(split.triplets) == len(records)
    for triplet, record in zip(split.triplets, records):
        assert triplet.reference == record["reference"] and triplet.target == record["target_hard"]
        assert triplet.pair_id == record["pairid"] and triplet.texts == (record["caption"].strip(),)
        assert triplet.members == tuple(record["img_set"]["members"])
        assert dict(triplet.meta["target_soft"]) == record["target_soft"]
        assert -1.0 in triplet.meta["target_soft"].values()
        assert triplet.meta["img_set_id"] == record["img_set"]["id"]
    # nested ./train/34/name.png paths resolve under the root
    first = split.gallery_ids[0]
    assert split.images.path_of(first) == (cirr_root / paths[first]).resolve()
    assert split.images[first].shape == (3, 8, 8)


def test_cirr_test1_has_no_targets_and_splits_are_listed(cirr_root):
    split = load_cirr(cirr_root, "test1")
    assert all(t.target is None for t in split.triplets) and split.info["has_targets"] is False
    assert all(len(t.members) == 6 for t in split.triplets)
    assert cirr_splits(cirr_root) == ["test1", "train", "val"]
    with pytest.raises(AnnotationError, match="test1"):
        load_cirr(cirr_root, "test2")  # the error lists the splits present


def _cirr_with(tmp_path, cirr_root, edit, split="val"):
    root = _copy_tree(cirr_root, tmp_path / "c")
    path = root / "cirr/captions" / f"cap.rc2.{split}.json"
    records = json.loads(path.read_text())
    edit(records, root)
    path.write_text(json.dumps(records))
    return root


def test_cirr_record_errors_name_file_index_field(tmp_path, cirr_root):
    def dup(records, root):
        records[2]["pairid"] = records[0]["pairid"]

    root = _cirr_with(tmp_path, cirr_root, dup)
    with pytest.raises(AnnotationError) as info:
        load_cirr(root, "val")
    assert "cap.rc2.val.json" in str(info.value) and "record 2" in str(info.value) and "duplicate" in str(info.value)
    skipped = load_cirr(root, "val", on_bad_record="skip")
    assert len(skipped.triplets) == 3 and skipped.info["skipped"] == 1


@pytest.mark.parametrize("field,value,words", [
    ("reference", "nope-img0", "not in the split's image list"),
    ("target_hard", 17, "non-empty image name"),
    ("caption", "   ", "empty or whitespace"),
    ("pairid", "7", "must be an int"),
    ("img_set", {"members": "x"}, "img_set.members"),
])
def test_cirr_bad_fields(tmp_path, cirr_root, field, value, words):
    def edit(records, root):
        records[1][field] = value

    root = _cirr_with(tmp_path, cirr_root, edit)
    with pytest.raises(AnnotationError, match="record 1") as info:
        load_cirr(root, "val")
    assert words in str(info.value)


def test_cirr_malformed_and_unsafe_files(tmp_path, cirr_root):
    root = _copy_tree(cirr_root, tmp_path / "c")
    path = root / "cirr/captions/cap.rc2.val.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(AnnotationError, match=r"malformed or truncated JSON at line \d+ column \d+"):
        load_cirr(root, "val")
    path.write_text("")
    with pytest.raises(AnnotationError, match="empty"):
        load_cirr(root, "val")
    path.write_text(text)
    splits = root / "cirr/image_splits/split.rc2.val.json"
    paths = json.loads(splits.read_text())
    name = next(iter(paths))
    for bad in ["../../etc/passwd", "/etc/passwd"]:
        splits.write_text(json.dumps({**paths, name: bad}))
        with pytest.raises(UnsafePathError) as info:
            load_cirr(root, "val")
        assert name in str(info.value) and "split.rc2.val.json" in str(info.value) and bad in str(info.value)
    splits.write_text('{"a": "./dev/a.png", "a": "./dev/b.png"}')
    with pytest.raises(AnnotationError, match="appears twice"):
        load_cirr(root, "val")


# ------------------------------------------------------------------------------------ FashionIQ


def test_fashioniq_texts_extensions_and_meta(fiq_root):
    split = cp.load_fashioniq(fiq_root, "dress", "val", size=8)
    records = json.loads((fiq_root / "captions/cap.dress.val.json").read_text())
    assert split.protocol == "fashioniq" and split.category == "dress" and len(split.triplets) == len(records)
    for triplet, record in zip(split.triplets, records):
        c0, c1 = record["captions"]
        assert triplet.texts == (
            f"{c0.strip('.?, ')} and {c1.strip('.?, ')}",
            f"{c1.strip('.?, ')} and {c0.strip('.?, ')}",
        )
        assert triplet.reference == record["candidate"] and triplet.target == record["target"]
        assert triplet.meta["category"] == "dress" and tuple(triplet.meta["captions"]) == (c0, c1)
    assert fashioniq_text(" is red.", "has no sleeves?") == "is red and has no sleeves"
    suffixes = {split.images.path_of(i).suffix for i in split.gallery_ids}
    assert suffixes == {".jpg", ".png"}
    assert all(split.images.path_of(i).is_file() for i in split.gallery_ids)
    assert split.images.batch(split.gallery_ids).shape == (len(split.gallery_ids), 3, 8, 8)


def test_fashioniq_test_split_and_dispatcher(fiq_root, cirr_root):
    test = load_fashioniq(fiq_root, "toptee", "test")
    assert test.triplets and all(t.target is None for t in test.triplets)
    assert load_split(fiq_root, "fashioniq", "val", category="shirt").category == "shirt"
    assert load_split(cirr_root, "cirr", "val").protocol == "cirr"
    with pytest.raises(ConfigError):
        load_split(fiq_root, "fashioniq", "val")
    with pytest.raises(ConfigError):
        load_fashioniq(fiq_root, "shoes", "val")


def test_fashioniq_bad_records(tmp_path, fiq_root):
    root = _copy_tree(fiq_root, tmp_path / "f")
    path = root / "captions/cap.shirt.val.json"
    records = json.loads(path.read_text())
    records[3]["captions"] = ["  .", "fine"]
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=r"record 3, field 'captions\[0\]'"):
        load_fashioniq(root, "shirt", "val")
    loaded = load_fashioniq(root, "shirt", "val", on_bad_record="skip")
    assert len(loaded.triplets) == len(records) - 1 and loaded.info["skipped"] == 1
    records[3]["captions"] = ["fine", "also fine"]
    records[0]["target"] = "unknown-image"
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match="record 0, field 'target'"):
        load_fashioniq(root, "shirt", "val")
    names_path = root / "image_splits/split.shirt.val.json"
    names = json.loads(names_path.read_text())
    names_path.write_text(json.dumps(names + [names[0]]))
    with pytest.raises(AnnotationError, match="duplicate image name"):
        load_fashioniq(root, "shirt", "val")


# ------------------------------------------------------------------------------ property tests

NAMES = [f"img-{k}" for k in range(10)]
caption_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: s.strip() != "")


@st.composite
def cirr_records(draw):
    n = draw(st.integers(1, 6))
    pair_ids = draw(st.lists(st.integers(-5, 10**9), min_size=n, max_size=n, unique=True))
    records = []
    for pair_id in pair_ids:
        members = draw(st.lists(st.sampled_from(NAMES), min_size=6, max_size=6, unique=True))  # CIRR sets hold 6
        reference, target = members[0], draw(st.sampled_from(members[1:]))
        records.append({"pairid": pair_id, "reference": reference, "target_hard": target,
                        "target_soft": {target: draw(st.sampled_from([1.0, 0.5, -1.0]))},
                        "caption": draw(caption_st), "img_set": {"id": draw(st.integers(0, 99)), "members": members}})
    return records


def _write_cirr(root: Path, records, text=None, splits_text=None):
    (root / "cirr/captions").mkdir(parents=True, exist_ok=True)
    (root / "cirr/image_splits").mkdir(parents=True, exist_ok=True)
    if splits_text is None:
        splits_text = json.dumps({n: f"./dev/{n}.png" for n in NAMES})
    (root / "cirr/image_splits/split.rc2.val.json").write_text(splits_text)
    (root / "cirr/captions/cap.rc2.val.json").write_text(text if text is not None else json.dumps(records))


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cirr_records())
def test_property_cirr_valid_records_round_trip(records):
    with tempfile.TemporaryDirectory() as tmp:
        _write_cirr(Path(tmp), records)
        split = load_cirr(tmp, "val")
    assert [t.pair_id for t in split.triplets] == [r["pairid"] for r in records]
    assert [t.texts[0] for t in split.triplets] == [r["caption"].strip() for r in records]
    assert [t.target for t in split.triplets] == [r["target_hard"] for r in records]
    assert [list(t.members) for t in split.triplets] == [r["img_set"]["members"] for r in records]


WRONG = {
    "pairid": st.one_of(
        st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.lists(st.integers(), max_size=2)
    ),
    "reference": st.one_of(
        st.none(),
        st.integers(),
        st.just(""),
        st.just("  "),
        st.text(min_size=1).filter(lambda s: s not in NAMES),
        st.lists(st.text(), max_size=2),
    ),
    "target_hard": st.one_of(
        st.none(),
        st.integers(),
        st.just(""),
        st.text(min_size=1).filter(lambda s: s not in NAMES),
        st.dictionaries(st.text(), st.integers(), max_size=2),
    ),
    "caption": st.one_of(
        st.none(), st.integers(), st.text(alphabet=" \t\n", max_size=4), st.lists(st.text(), max_size=2)
    ),
    "img_set": st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=3),
        st.fixed_dictionaries(
            {"members": st.one_of(st.just([]), st.integers(), st.lists(st.integers(), min_size=1, max_size=3))}
        ),
    ),
    "target_soft": st.one_of(
        st.none(),
        st.integers(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=2),
    ),
}


@SETTINGS
@given(cirr_records(), st.data())
def test_property_cirr_corruptions_raise_annotation_error(records, data):
    kind = data.draw(st.sampled_from(["truncate", "wrong_type", "delete", "duplicate", "not_object",
                                      "splits_truncate", "splits_wrong_type"]))
    index = data.draw(st.integers(0, len(records) - 1))
    text = splits_text = None
    if kind == "splits_truncate":
        full = json.dumps({n: f"./dev/{n}.png" for n in NAMES})
        splits_text = full[: data.draw(st.integers(0, len(full) - 1))]
    elif kind == "splits_wrong_type":
        value = data.draw(st.one_of(st.none(), st.integers(), st.just(""), st.lists(st.text(), max_size=2)))
        whole = data.draw(st.booleans())
        splits_text = json.dumps(NAMES if whole else {**{n: f"./dev/{n}.png" for n in NAMES}, NAMES[0]: value})
    elif kind == "truncate":
        full = json.dumps(records)
        text = full[: data.draw(st.integers(0, len(full) - 1))]
    elif kind == "wrong_type":
        field = data.draw(st.sampled_from(sorted(WRONG)))
        records[index][field] = data.draw(WRONG[field])
    elif kind == "delete":
        del records[index][data.draw(st.sampled_from(["pairid", "reference", "caption", "img_set"]))]
    elif kind == "duplicate":
        records.append(dict(records[index]))
    else:
        records[index] = data.draw(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
    with tempfile.TemporaryDirectory() as tmp:
        _write_cirr(Path(tmp), records, text, splits_text)
        with pytest.raises(AnnotationError):
            load_cirr(tmp, "val")
        # record-level problems can be skipped instead, and are counted
        if kind not in ("truncate", "splits_truncate", "splits_wrong_type"):
            split = load_cirr(tmp, "val", on_bad_record="skip")
            assert split.info["skipped"] == 1 and len(split.triplets) == len(records) - 1


@st.composite
def fiq_records(draw):
    n = draw(st.integers(1, 6))
    return [{"candidate": draw(st.sampled_from(NAMES)), "target": draw(st.sampled_from(NAMES)),
             "captions": [draw(caption_st.filter(lambda s: s.strip(".?, ").strip())) for _ in range(2)]}
            for _ in range(n)]


def _write_fiq(root: Path, records, text=None):
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "image_splits/split.dress.val.json").write_text(json.dumps(NAMES))
    (root / "captions/cap.dress.val.json").write_text(text if text is not None else json.dumps(records))


@SETTINGS
@given(fiq_records())
def test_property_fashioniq_valid_records_round_trip(records):
    with tempfile.TemporaryDirectory() as tmp:
        _write_fiq(Path(tmp), records)
        split = load_fashioniq(tmp, "dress", "val")
    assert [(t.reference, t.target) for t in split.triplets] == [(r["candidate"], r["target"]) for r in records]
    assert [t.texts[0] for t in split.triplets] == [fashioniq_text(*r["captions"]) for r in records]
    assert [t.texts[1] for t in split.triplets] == [fashioniq_text(*r["captions"][::-1]) for r in records]


FIQ_WRONG = {
    "candidate": WRONG["reference"],
    "target": WRONG["target_hard"],
    "captions": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(min_size=1), max_size=1),
                          st.lists(st.text(min_size=1), min_size=3, max_size=4),
                          st.tuples(st.text(alphabet=".?, \t", max_size=3), st.just("ok")).map(list),
                          st.lists(st.integers(), min_size=2, max_size=2)),
}


@SETTINGS
@given(fiq_records(), st.data())
def test_property_fashioniq_corruptions_raise_annotation_error(records, data):
    kind = data.draw(st.sampled_from(["truncate", "wrong_type", "delete", "not_object"]))
    index = data.draw(st.integers(0, len(records) - 1))
    text = None
    if kind == "truncate":
        full = json.dumps(records)
        text = full[: data.draw(st.integers(0, len(full) - 1))]
    elif kind == "wrong_type":
        field = data.draw(st.sampled_from(sorted(FIQ_WRONG)))
        records[index][field] = data.draw(FIQ_WRONG[field])
    elif kind == "delete":
        del records[index][data.draw(st.sampled_from(["candidate", "captions"]))]
    else:
        records[index] = data.draw(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers())))
    with tempfile.TemporaryDirectory() as tmp:
        _write_fiq(Path(tmp), records, text)
        with pytest.raises(AnnotationError):
            load_fashioniq(tmp, "dress", "val")
