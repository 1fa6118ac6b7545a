"""The command line decides skip-or-fail for bad annotation records: fail by default, naming the
file, record and field; ``--on-bad-record skip`` logs, counts and drops the record."""

from __future__ import annotations

import argparse
import json

import pytest
from _toy import pair_encoder_source

from cir_plugins.cli import augment as augment_command
from cir_plugins.cli import build_bank as bank_command
from cir_plugins.cli._common import load_dataset
from cir_plugins.data.fixtures import build_cirr_tree
from cir_plugins.errors import AnnotationError


@pytest.fixture()
def broken_tree(tmp_path):
    root = build_cirr_tree(tmp_path / "cirr", splits=("train",))
    path = root / "cirr" / "captions" / "cap.rc2.train.json"
    records = json.loads(path.read_text())
    records[2]["pairid"] = records[0]["pairid"]  # a duplicate pair id in record 2
    path.write_text(json.dumps(records))
    return root, len(records)


def _bank_args(root, *extra):
    parser = argparse.ArgumentParser()
    bank_command.configure(parser)
    return parser.parse_args(["--model", "x.py:f", "--dataset", "cirr", "--root", str(root), "--out", "b.st", *extra])


def test_build_bank_and_stage2_dataset_loading_fail_by_default_and_skip_on_request(broken_tree, caplog):
    root, n_records = broken_tree
    with pytest.raises(AnnotationError) as caught:
        load_dataset(_bank_args(root))
    assert "cap.rc2.train.json" in str(caught.value) and "record 2" in str(caught.value)
    with caplog.at_level("WARNING"):
        split = load_dataset(_bank_args(root, "--on-bad-record", "skip"))
    assert len(split.triplets) == n_records - 1 and split.info["skipped"] == 1
    assert any("skipped 1 of" in r.getMessage() for r in caplog.records)


def test_augment_has_the_same_switch_defaulting_to_error():
    parser = argparse.ArgumentParser()
    augment_command.configure(parser)
    base = ["--dataset", "cirr", "--root", "r", "--captioner", "file:c.json", "--pair-encoder", "x.py:f", "--out", "o"]
    assert parser.parse_args(base).on_bad_record == "error"
    assert parser.parse_args(base + ["--on-bad-record", "skip"]).on_bad_record == "skip"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--on-bad-record", "ignore"])


ENCODER = pair_encoder_source(8)


def test_augment_stops_on_an_unreadable_image_by_default_and_skips_it_on_request(tmp_path, capsys):
    import cir_plugins as cp
    from cir_plugins.cli import main
    from cir_plugins.errors import ImageLoadError

    root = build_cirr_tree(tmp_path / "root", splits=("train",))
    split = cp.load_cirr(root, "train")
    ids = list(split.gallery_ids)
    broken = ids[3]
    split.images.path_of(broken).write_bytes(b"")  # a zero-byte download
    (tmp_path / "captions.json").write_text(json.dumps({i: f"a photo number {k}" for k, i in enumerate(ids)}))
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "gen" / "cap.rc2.generated.json"
    argv = ["augment", "--dataset", "cirr", "--root", str(root), "--captioner", f"file:{tmp_path / 'captions.json'}",
            "--pair-encoder", f"{tmp_path / 'enc.py'}:build", "--rank-window", "0.0,0.5", "--image-size", "16",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 2  # the console entry turns the library's error into a message and exit code 2
    error = capsys.readouterr().err
    assert broken in error and "zero-byte" in error and "Fix:" in error
    assert not out.exists()
    assert main(argv + ["--skip-unreadable"]) == 0
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert summary["unreadable_skipped"] == [broken] and summary["images"] == len(ids) - 1
    assert "skipped 1 unreadable" in capsys.readouterr().out
    with pytest.raises(ImageLoadError):  # the library call itself raises, naming the id
        split.images.batch(ids)
