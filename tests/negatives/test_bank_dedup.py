"""De-duplication on by default wherever a bank is built from images: one row per group of pixel-identical
images, and a copy of a query's target counts as the target, never as a negative."""

from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F
from _toy import make_model

import cir_plugins as cp
from cir_plugins.data.fixtures import build_fashioniq_tree
from cir_plugins.data.triplet import Triplet
from cir_plugins.negatives.bank import NegativeBank, exclusion_rows
from cir_plugins.negatives.loss import bank_contrastive_loss


def _images_with_copies():
    """8 distinct random images plus exact copies: c3 == i3, c5a == c5b == i5 (11 ids, 8 groups)."""
    g = torch.Generator().manual_seed(3)
    images = {f"i{k}": torch.randn(3, 4, 4, generator=g) for k in range(8)}
    images["c3"] = images["i3"].clone()
    images["c5a"] = images["i5"].clone()
    images["c5b"] = images["i5"].clone()
    return images


def test_default_build_has_one_row_per_group_of_identical_images():
    images = _images_with_copies()
    ids = list(images)
    bank = NegativeBank.build(make_model(), ids, images, show_progress=False)
    assert len(bank) == 8 and len(bank.ids) == 11
    assert bank.row_of("c3") == bank.row_of("i3")
    assert bank.row_of("c5a") == bank.row_of("c5b") == bank.row_of("i5")
    assert len({bank.row_of(f"i{k}") for k in range(8)}) == 8
    # one row per id only when asked (no image is a negative of its own copy by default)
    assert len(NegativeBank.build(make_model(), ids, images, dedup=False, show_progress=False)) == 11


def test_a_copy_of_the_target_is_the_target_not_a_negative():
    torch.manual_seed(0)
    images = _images_with_copies()
    ids = list(images)
    model = make_model()
    bank = NegativeBank.build(model, ids, images, show_progress=False)
    per_id = NegativeBank.build(model, ids, images, dedup=False, show_progress=False)
    # the query's target is i3, whose copy c3 is in the gallery; a second triplet names the copy as target
    triplets = [Triplet("i0", ("make it i3",), "i3"), Triplet("i1", ("make it c3",), "c3")]
    query = F.normalize(torch.randn(2, bank.embeddings.shape[1], dtype=torch.float64), dim=-1)
    rows = bank.rows_of([t.target for t in triplets])
    assert rows[0] == rows[1]  # either member of the group is the same positive
    tau = torch.tensor(0.05, dtype=torch.float64)
    loss = bank_contrastive_loss(query, bank.embeddings.double(), rows, tau)
    # plain reference: cross-entropy over the 8 distinct images, the target's group once
    unique = F.normalize(model.encode_image(torch.stack([images[f"i{k}"] for k in range(8)])).double(), dim=-1)
    expected = F.cross_entropy(query @ unique.T / tau, torch.tensor([3, 3]))
    assert torch.allclose(loss, expected)
    # with a row per id the copy competes with the target as a negative: a higher loss
    per_id_loss = bank_contrastive_loss(query, per_id.embeddings.double(),
                                        per_id.rows_of([t.target for t in triplets]), tau)
    assert per_id_loss > loss + 1e-6


def test_reference_copies_are_masked_with_the_reference_but_never_the_target():
    images = _images_with_copies()
    bank = NegativeBank.build(make_model(), list(images), images, show_progress=False)
    rows = exclusion_rows(bank, [Triplet("c5a", ("t",), "i0"), Triplet("i3", ("t",), "c3")])
    assert rows[:, 0].tolist() == [bank.row_of("i5"), -1]  # c5a masks its group's row; i3 IS the target (c3)


def test_image_store_dedup_uses_decoded_pixels(tmp_path):
    root = build_fashioniq_tree(tmp_path / "fiq", categories=("dress",), splits=("train",), n_images=6)
    names = [f"B0dress_train{k:02d}" for k in range(6)]
    # names 1 and 4 are both .jpg: make 4 a byte copy of 1 (pixel-identical once decoded)
    shutil.copy(root / "images" / f"{names[1]}.jpg", root / "images" / f"{names[4]}.jpg")
    split = cp.load_fashioniq(root, "dress", "train", size=4)  # the toy model reads 3 x 4 x 4
    bank = NegativeBank.build(make_model(dim=16), list(split.gallery_ids), split.images, show_progress=False)
    assert len(bank) == 5 and bank.row_of(names[4]) == bank.row_of(names[1])


def test_cli_build_bank_dedups_by_default(tmp_path):
    from pathlib import Path

    from cir_plugins.cli import run_command
    from cir_plugins.data.fixtures import build_cirr_tree

    root = build_cirr_tree(tmp_path / "cirr", n_images=8, n_triplets=2, splits=("train",))
    paths = __import__("json").loads((root / "cirr" / "image_splits" / "split.rc2.train.json").read_text())
    names = list(paths)
    shutil.copy(root / paths[names[0]], root / paths[names[5]])  # names[5] becomes a copy of names[0]
    factory = tmp_path / "factory.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
                       "from _toy import make_model\ndef build():\n    return make_model()\n")
    common = ["--model", f"{factory}:build", "--dataset", "cirr", "--root", str(root), "--image-size", "4",
              "--no-progress"]
    assert run_command("build-bank", [*common, "--out", str(tmp_path / "bank.safetensors")]) == 0
    bank = NegativeBank.load(tmp_path / "bank.safetensors")
    assert len(bank) == 7 and bank.row_of(names[5]) == bank.row_of(names[0])
    assert run_command("build-bank", [*common, "--no-dedup", "--out", str(tmp_path / "per_id.safetensors")]) == 0
    assert len(NegativeBank.load(tmp_path / "per_id.safetensors")) == 8
