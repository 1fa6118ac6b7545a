"""check_dataset on fixture trees in the exact layouts: a complete tree passes; missing, empty, truncated,
corrupt and duplicate images are each named, with the triplets and gallery entries they break."""

import json
import shutil

import pytest

from cir_plugins.data.check import OFFICIAL_COUNTS, check_dataset
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.errors import ConfigError, DataError


def _cirr_paths(root, split):
    return json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())


def _records(root, split):
    return json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())


@pytest.fixture()
def cirr(tmp_path):
    return build_cirr_tree(tmp_path / "cirr_root")


@pytest.mark.parametrize("decode", [False, True])
def test_complete_trees_pass(tmp_path, decode):
    for dataset, root in (
        ("cirr", build_cirr_tree(tmp_path / "c")),
        ("fashioniq", build_fashioniq_tree(tmp_path / "f")),
    ):
        report = check_dataset(root, dataset, counts=None, decode=decode)
        assert report.ok, report.format()
        assert report.problems == [] and report.images["duplicates"] == []
        assert all(not u["bad_images"] and not u["broken_triplets"] for u in report.splits)
        assert "COMPLETE" in report.format()
    assert report.images["checked"] == 9 * 8  # FashionIQ: 3 categories x 3 splits x 8 images


@pytest.mark.parametrize("decode", [False, True])
def test_cirr_missing_truncated_duplicate_are_named(cirr, decode, tmp_path):
    paths = _cirr_paths(cirr, "val")
    names = list(paths)
    missing, truncated, original, copy = names[0], names[1], names[2], names[3]
    (cirr / paths[missing]).unlink()
    data = (cirr / paths[truncated]).read_bytes()
    (cirr / paths[truncated]).write_bytes(data[: len(data) // 2])  # header intact, end cut off
    shutil.copy(cirr / paths[original], cirr / paths[copy])
    report = check_dataset(cirr, "cirr", counts=None, decode=decode)
    assert not report.ok
    assert [e["names"] for e in report.images["missing"]] == [[missing]]
    bad_kind = "corrupt" if decode else "truncated"  # a full decode fails; the header check sees no end marker
    assert [e["names"] for e in report.images[bad_kind]] == [[truncated]]
    assert [g["names"] for g in report.images["duplicates"]] == [sorted([original, copy])]
    assert report.images["duplicates"][0]["kind"] == ("equal pixels" if decode else "equal bytes")
    val = next(u for u in report.splits if u["name"] == "val")
    assert sorted(val["bad_images"]) == sorted([missing, truncated]) == sorted(val["broken_gallery"])
    expected_broken = [r["pairid"] for r in _records(cirr, "val")
                       if {missing, truncated} & {r["reference"], r.get("target_hard"), *r["img_set"]["members"]}]
    assert [t["query"] for t in val["broken_triplets"]] == expected_broken and expected_broken
    text = report.format()
    for name in (missing, truncated, original, copy):
        assert name in text
    assert "INCOMPLETE" in text and "to do:" in text
    others = [u for u in report.splits if u["name"] != "val"]
    assert all(not u["bad_images"] for u in others)
    out = report.write_json(tmp_path / "reports" / "check.json")
    saved = json.loads(out.read_text())
    assert saved["ok"] is False and saved["images"]["missing"][0]["names"] == [missing]


def test_duplicates_alone_warn_but_pass(cirr):
    paths = _cirr_paths(cirr, "train")
    a, b = list(paths)[:2]
    shutil.copy(cirr / paths[a], cirr / paths[b])
    report = check_dataset(cirr, "cirr", counts=None)
    assert report.ok and report.warnings
    assert [g["names"] for g in report.images["duplicates"]] == [sorted([a, b])]


def test_two_names_for_one_file_are_a_duplicate(cirr):
    split_file = cirr / "cirr" / "image_splits" / "split.rc2.test1.json"
    paths = json.loads(split_file.read_text())
    names = list(paths)
    paths[names[1]] = paths[names[0]]
    split_file.write_text(json.dumps(paths))
    report = check_dataset(cirr, "cirr", counts=None)
    groups = [g for g in report.images["duplicates"] if g["kind"] == "same file"]
    assert [g["names"] for g in groups] == [sorted(names[:2])]


def test_empty_and_non_image_files(cirr):
    paths = _cirr_paths(cirr, "train")
    empty, text = list(paths)[:2]
    (cirr / paths[empty]).write_bytes(b"")
    (cirr / paths[text]).write_text("<html>404 not found</html>")
    report = check_dataset(cirr, "cirr", counts=None)
    assert [e["names"] for e in report.images["empty"]] == [[empty]]
    assert [e["names"] for e in report.images["corrupt"]] == [[text]]
    assert not report.ok


def test_fashioniq_truncated_jpeg_missing_and_copy(tmp_path):
    root = build_fashioniq_tree(tmp_path / "f", categories=("dress",))
    names = json.loads((root / "image_splits" / "split.dress.val.json").read_text())
    jpgs = [n for n in names if (root / "images" / f"{n}.jpg").exists()]
    gone, cut, original, copy = jpgs[:4]
    (root / "images" / f"{gone}.jpg").unlink()
    data = (root / "images" / f"{cut}.jpg").read_bytes()
    (root / "images" / f"{cut}.jpg").write_bytes(data[:-40])
    shutil.copy(root / "images" / f"{original}.jpg", root / "images" / f"{copy}.jpg")
    report = check_dataset(root, "fashioniq", categories=["dress"], counts=None)
    assert [e["names"] for e in report.images["missing"]] == [[gone]]
    assert [e["names"] for e in report.images["truncated"]] == [[cut]]
    assert [g["names"] for g in report.images["duplicates"]] == [sorted([original, copy])]
    val = next(u for u in report.splits if u["name"] == "dress/val")
    records = json.loads((root / "captions" / "cap.dress.val.json").read_text())
    assert [t["query"] for t in val["broken_triplets"]] == [
        i for i, r in enumerate(records) if {gone, cut} & {r["candidate"], r["target"]}]


def test_counts_compared_with_official_or_given(cirr):
    report = check_dataset(cirr, "cirr")  # the fixture is tiny: every split differs from the release
    assert not report.ok and all(u["counts_match"] is False for u in report.splits)
    assert report.splits[0]["official"] == OFFICIAL_COUNTS["cirr"]["train"]
    assert "28225" in report.format()
    given = {s: {"images": 12, "triplets": 4} for s in ("train", "val", "test1")}
    assert check_dataset(cirr, "cirr", counts=given).ok
    given["val"] = {"images": 13, "triplets": 4}
    assert not check_dataset(cirr, "cirr", counts=given).ok


def test_missing_annotation_file_and_bad_record(cirr):
    (cirr / "cirr" / "captions" / "cap.rc2.test1.json").unlink()
    records = _records(cirr, "val")
    records[1]["reference"] = "not-in-the-split"
    (cirr / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(records))
    report = check_dataset(cirr, "cirr", counts=None)
    test1 = next(u for u in report.splits if u["name"] == "test1")
    assert "cap.rc2.test1.json" in test1["error"]
    val = next(u for u in report.splits if u["name"] == "val")
    assert [r["index"] for r in val["skipped_records"]] == [1]
    assert not report.ok and len(report.problems) == 2


def test_bad_arguments(cirr, tmp_path):
    with pytest.raises(ConfigError, match="CIRR and FashionIQ"):
        check_dataset(cirr, "coco")
    with pytest.raises(ConfigError, match="categories"):
        check_dataset(cirr, "fashioniq", categories=["hat"])
    with pytest.raises(DataError, match="not a directory"):
        check_dataset(tmp_path / "nowhere", "cirr")


def test_command_exit_codes_and_report(cirr, tmp_path, capsys):
    from cir_plugins.cli import main

    out = tmp_path / "report.json"
    assert main(["check-data", "--dataset", "cirr", "--root", str(cirr), "--counts", "none", "--no-progress",
                 "--report", str(out)]) == 0
    assert json.loads(out.read_text())["ok"] is True
    assert main(["check-data", "--dataset", "cirr", "--root", str(cirr), "--no-progress"]) == 1  # official counts
    paths = _cirr_paths(cirr, "val")
    a, b = list(paths)[:2]
    shutil.copy(cirr / paths[a], cirr / paths[b])
    common = ["check-data", "--dataset", "cirr", "--root", str(cirr), "--counts", "none", "--no-progress"]
    assert main(common) == 0
    assert main(common + ["--strict"]) == 1
    (cirr / paths[a]).unlink()
    assert main(common + ["--splits", "train"]) == 0  # only the train split is read
    capsys.readouterr()
    assert main(common + ["--report", str(out)]) == 1
    printed = capsys.readouterr().out
    assert a in printed and "INCOMPLETE" in printed
    assert json.loads(out.read_text())["images"]["missing"][0]["names"] == [a]


def test_a_path_leaving_the_root_is_that_image_s_problem_only(cirr):
    split_file = cirr / "cirr" / "image_splits" / "split.rc2.val.json"
    paths = json.loads(split_file.read_text())
    first = next(iter(paths))
    paths[first] = "../../outside.png"
    split_file.write_text(json.dumps(paths))
    report = check_dataset(cirr, "cirr", counts=None)
    val = next(u for u in report.splits if u["name"] == "val")
    assert val["error"] is None and val["bad_images"] == [first] and not report.ok
    assert [e["names"] for e in report.images["bad_path"]] == [[first]]
    assert "climbs out" in report.images["bad_path"][0]["error"]
    assert all(u["error"] is None and u["images"] == 12 for u in report.splits)
