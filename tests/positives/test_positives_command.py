import json

import pytest
from _toy import pair_encoder_source

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.data.fixtures import build_cirr_tree, build_fashioniq_tree
from cir_plugins.positives.annotations import read_generated

ENCODER = pair_encoder_source(12)


def test_augment_command_cirr_with_captions_file(tmp_path, capsys):
    root = build_cirr_tree(tmp_path / "root", splits=("train",))
    ids = list(cp.load_cirr(root, "train").gallery_ids)
    (tmp_path / "captions.json").write_text(json.dumps({i: f"a photo number {k}" for k, i in enumerate(ids)}))
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "gen" / "cap.rc2.generated.json"
    argv = ["augment", "--dataset", "cirr", "--root", str(root), "--captioner", f"file:{tmp_path / 'captions.json'}",
            "--pair-encoder", f"{tmp_path / 'enc.py'}:build", "--factory-kwargs", '{"dim": 8}',
            "--rank-window", "0.0,0.5", "--partners", "2", "--seed", "4", "--image-size", "16",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "images" in printed and "duplicate groups" in printed and "triplets" in printed and "seconds" in printed
    triplets = read_generated(out)
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert len(triplets) == summary["triplets"] > 0
    assert all(t.source == "generated" and len(t.texts) == 2 for t in triplets)
    assert main(argv) == 0  # a re-run reuses the caption cache
    assert json.loads(out.with_name(out.name + ".summary.json").read_text())["captions"]["new"] == 0
    assert [(t.reference, t.target) for t in read_generated(out)] == [(t.reference, t.target) for t in triplets]


def test_augment_command_fashioniq_and_bad_spec(tmp_path, capsys):
    root = build_fashioniq_tree(tmp_path / "fiq", categories=("shirt",), splits=("train",))
    ids = list(cp.load_fashioniq(root, "shirt", "train").gallery_ids)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": i, "caption": f"shirt {k}"}) + "\n"
                                              for k, i in enumerate(ids)))
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "cap.shirt.generated.json"
    base = ["augment", "--dataset", "fashioniq", "--category", "shirt", "--root", str(root),
            "--pair-encoder", f"{tmp_path / 'enc.py'}:build", "--rank-window", "-1", "--image-size", "16",
            "--out", str(out), "--no-progress"]
    assert main(base + ["--captioner", f"file:{tmp_path / 'c.jsonl'}"]) == 0
    triplets = read_generated(out)
    assert triplets and all(t.texts == (t.meta["target_caption"],) for t in triplets)
    assert main(base + ["--captioner", "magic:thing"]) == 2
    assert "unknown captioner spec" in capsys.readouterr().err


@pytest.mark.slow  # builds a synthetic world (tens of seconds on the shared 2-core box)
def test_augment_command_synthetic(tmp_path):
    from cir_plugins.data.synthetic import make_world

    root = make_world(tmp_path / "world", size="quick", seed=0)
    (tmp_path / "enc.py").write_text(ENCODER)
    out = tmp_path / "synthetic.json"
    assert main(["augment", "--dataset", "synthetic", "--root", str(root), "--captioner", "synthetic:0.1",
                 "--pair-encoder", f"{tmp_path / 'enc.py'}:build", "--rank-window", "0.1,0.3",
                 "--max-triplets", "20", "--image-size", "16", "--out", str(out), "--no-progress"]) == 0
    triplets = read_generated(out)
    assert 0 < len(triplets) <= 20
    assert all(t.meta["reference_caption"] != t.meta["target_caption"] for t in triplets)
