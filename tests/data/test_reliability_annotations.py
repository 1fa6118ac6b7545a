"""Reliability of the annotation loaders, second pass (issue 18, items 8 and 11): CIRR img_sets of the wrong
size or without the target are bad records (honouring on_bad_record="skip"), and a 5000-digit pair id or a root
name over the filesystem's limit is an AnnotationError naming the file, not a raw traceback."""

from __future__ import annotations

import json

import pytest

from cir_plugins.data.cirr import CIRR_SET_SIZE, load_cirr
from cir_plugins.data.fashioniq import load_fashioniq
from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.errors import AnnotationError, ConfigError


def _edit_records(root, split, edit):
    path = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tree(tmp_path):
    return build_cirr_tree(tmp_path / "cirr_root", n_images=12, n_triplets=5, splits=("val", "test1"))


def test_the_fixture_and_cirr_sets_hold_six_images(tree):
    assert CIRR_SET_SIZE == 6
    assert all(len(t.members) == 6 for t in load_cirr(tree, "val").triplets)


@pytest.mark.parametrize("split", ["val", "test1"])
def test_members_of_the_wrong_length_are_refused_naming_the_record(tree, split):
    def shrink(records):  # the attack: [reference, target] for a record, which inflated Rs@k to 100
        record = records[2]
        record["img_set"]["members"] = [record["reference"]] + ([record["target_hard"]] if "target_hard" in record
                                                                 else [m for m in record["img_set"]["members"]
                                                                       if m != record["reference"]][:1])

    path = _edit_records(tree, split, shrink)
    with pytest.raises(AnnotationError, match=r"record 2, field 'img_set.members': must list exactly 6 images.*got 2"):
        load_cirr(tree, split)
    assert str(path) in str(pytest.raises(AnnotationError, load_cirr, tree, split).value)
    skipped = load_cirr(tree, split, on_bad_record="skip")
    assert len(skipped.triplets) == 4 and skipped.info["skipped"] == 1
    assert skipped.info["skipped_records"][0]["index"] == 2
    # a dataset of one's own with other set sizes: set_size=None accepts it
    assert len(load_cirr(tree, split, set_size=None).triplets) == 5


def test_seven_members_are_refused_too(tree):
    def grow(records):
        extra = next(n for n in json.loads((tree / "cirr/image_splits/split.rc2.val.json").read_text())
                     if n not in records[0]["img_set"]["members"])
        records[0]["img_set"]["members"].append(extra)

    _edit_records(tree, "val", grow)
    with pytest.raises(AnnotationError, match=r"record 0.*exactly 6 images.*got 7"):
        load_cirr(tree, "val")


def test_a_target_outside_the_members_is_caught_at_load(tree):
    def swap(records):
        record = records[1]
        members = record["img_set"]["members"]
        outside = next(n for n in json.loads((tree / "cirr/image_splits/split.rc2.val.json").read_text())
                       if n not in members)
        members[members.index(record["target_hard"])] = outside  # still 6 members, the target no longer one

    _edit_records(tree, "val", swap)
    with pytest.raises(AnnotationError, match=r"record 1, field 'target_hard': is not among img_set.members"):
        load_cirr(tree, "val")
    assert len(load_cirr(tree, "val", on_bad_record="skip").triplets) == 4


def test_set_size_is_validated(tree):
    with pytest.raises(ConfigError, match="set_size"):
        load_cirr(tree, "val", set_size=1)


def test_a_5000_digit_pair_id_names_the_file(tree):
    path = tree / "cirr" / "captions" / "cap.rc2.val.json"
    text = path.read_text()
    first = json.loads(text)[0]["pairid"]
    path.write_text(text.replace(f'"pairid": {first}', '"pairid": ' + "9" * 5000, 1))
    with pytest.raises(AnnotationError, match=r"cap\.rc2\.val\.json holds a value JSON parsing refuses"):
        load_cirr(tree, "val")


def test_a_root_or_split_name_over_the_filesystem_limit_names_the_path(tmp_path):
    long_root = tmp_path / ("r" * 300)
    with pytest.raises(AnnotationError, match=r"the path cannot be checked.*File name too long"):
        load_cirr(long_root, "val")
    with pytest.raises(AnnotationError, match=r"the path cannot be checked"):
        load_fashioniq(long_root, "dress", "val")
    tree = build_cirr_tree(tmp_path / "ok", splits=("val",))
    with pytest.raises(AnnotationError, match=r"the path cannot be checked"):
        load_cirr(tree, "v" * 300)
