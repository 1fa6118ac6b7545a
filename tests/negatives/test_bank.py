"""NegativeBank: build, rows and duplicates, save/load, refusal of foreign banks, exclusion rows."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _toy import make_model, make_world
from safetensors import safe_open

from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import BankMismatchError, DataError, ShapeError
from cir_plugins.negatives.bank import NegativeBank, exclusion_rows, probe_split
from cir_plugins.negatives.loss import bank_contrastive_loss


@pytest.fixture()
def world():
    return make_world(n_images=23, n_train=10, n_val=3)


def test_build_matches_plain_encoding_at_odd_batch(world):
    images, _, _ = world
    model = make_model()
    ids = list(images)
    bank = NegativeBank.build(model, ids, images, batch_size=5, show_progress=False)
    expected = F.normalize(model.encode_image(torch.stack([images[i] for i in ids])).detach(), dim=-1)
    assert bank.embeddings.shape == (23, 16) and bank.embeddings.dtype == torch.float32
    assert torch.allclose(bank.embeddings, expected, atol=1e-6)
    assert bank.rows_of(ids).tolist() == list(range(23))
    assert len(bank) == 23 and bank.similarity == "dot"
    assert not bank.embeddings.requires_grad


def test_duplicates_share_one_row_encoded_once(world):
    images, _, _ = world
    model = make_model()
    ids = list(images)
    groups = {ids[3]: "g", ids[7]: "g", ids[11]: "g", ids[0]: "h", ids[1]: "h"}
    split = probe_split(model, images[ids[0]][None])  # probing runs encode_image once; done before counting
    calls = []
    original = model.encode_image
    model.encode_image = lambda x: calls.append(x.shape[0]) or original(x)
    bank = NegativeBank.build(model, ids, images, groups=groups, batch_size=4, show_progress=False, split=split)
    assert len(bank) == 23 - 3 and sum(calls) == 20
    assert bank.row_of(ids[3]) == bank.row_of(ids[7]) == bank.row_of(ids[11])
    assert bank.row_of(ids[0]) == bank.row_of(ids[1]) != bank.row_of(ids[3])
    expected = F.normalize(original(images[ids[3]][None]).detach(), dim=-1)[0]
    assert torch.allclose(bank.embeddings[bank.row_of(ids[11])], expected, atol=1e-6)
    assert len(bank.ids) == 23


def test_unknown_id_is_named(world):
    images, _, _ = world
    bank = NegativeBank.build(make_model(), list(images), images, show_progress=False)
    with pytest.raises(DataError, match="nope"):
        bank.row_of("nope")
    with pytest.raises(DataError, match="ghost"):
        bank.rows_of(["img000", "ghost"])
    with pytest.raises(DataError, match="missing-image"):
        NegativeBank.build(make_model(), ["img000", "missing-image"], images, show_progress=False)


def test_repeated_ids_are_named_once_each(world):
    images, _, _ = world
    with pytest.raises(DataError, match=r"image ids repeat.*\['img001', 'img000'\]"):
        NegativeBank.build(make_model(), ["img000", "img001", "img001", "img000", "img001"], images,
                           show_progress=False)
    emb = F.normalize(torch.randn(2, 4), dim=-1)
    with pytest.raises(DataError, match=r"bank ids must be unique.*\['b'\]"):
        NegativeBank(emb, ["a", "b", "c", "b"], [0, 1, 1, 0], similarity="dot", fingerprint="x")


def test_save_load_round_trip_and_same_loss(world, tmp_path):
    images, train, _ = world
    model = make_model()
    ids = list(images)
    groups = {ids[2]: "a", ids[5]: "a"}
    bank = NegativeBank.build(model, ids, images, groups=groups, show_progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["shape"]) == [22, 16] and meta["similarity"] == "dot"
    assert meta["fingerprint"] == bank.fingerprint and len(json.loads(meta["ids"])) == 23
    loaded = NegativeBank.load(path)
    assert torch.equal(loaded.embeddings, bank.embeddings)
    assert loaded.ids == bank.ids and loaded.row_of(ids[5]) == bank.row_of(ids[2])
    loaded.check_compatible(model, sample=images[ids[0]][None])
    query = F.normalize(torch.randn(7, 16), dim=-1)
    targets = [t.target for t in train[:7]]
    args = dict(exclude_rows=exclusion_rows(bank, train[:7]))
    a = bank_contrastive_loss(query, bank.embeddings, bank.rows_of(targets), 0.05, **args)
    b = bank_contrastive_loss(query, loaded.embeddings, loaded.rows_of(targets), 0.05,
                              exclude_rows=exclusion_rows(loaded, train[:7]))
    assert torch.equal(a, b)


def test_bf16_bank_round_trip(world, tmp_path):
    images, _, _ = world
    bank = NegativeBank.build(make_model(), list(images), images, dtype="bfloat16", show_progress=False)
    assert bank.embeddings.dtype == torch.bfloat16
    bank.save(tmp_path / "b.safetensors")
    loaded = NegativeBank.load(tmp_path / "b.safetensors")
    assert loaded.embeddings.dtype == torch.bfloat16 and torch.equal(loaded.embeddings, bank.embeddings)


def test_bank_of_another_model_is_refused(world):
    images, _, _ = world
    sample = images["img000"][None]
    bank = NegativeBank.build(make_model(seed=0), list(images), images, show_progress=False)
    with pytest.raises(BankMismatchError, match="fingerprint"):
        bank.check_compatible(make_model(seed=1), sample=sample)
    changed = make_model(seed=0)
    with torch.no_grad():
        changed.image_proj.bias[0] += 1e-3
    with pytest.raises(BankMismatchError, match="fingerprint"):
        bank.check_compatible(changed, sample=sample)
    with pytest.raises(BankMismatchError, match="embedding shape"):
        bank.check_compatible(make_model(dim=8), sample=sample)
    with pytest.raises(BankMismatchError, match="similarity"):
        bank.check_compatible(make_model(tokens_per_image=2), sample=sample)
    # the query side does not matter: a model with other text weights accepts the bank
    other_text = make_model(seed=0)
    with torch.no_grad():
        other_text.fuse.weight.add_(1.0)
    bank.check_compatible(other_text, sample=sample)


def test_multi_vector_bank(world, tmp_path):
    images, _, _ = world
    model = make_model(tokens_per_image=3)
    bank = NegativeBank.build(model, list(images), images, batch_size=6, show_progress=False)
    assert bank.embeddings.shape == (23, 3, 16) and bank.similarity == "max_token"
    assert torch.allclose(bank.embeddings.norm(dim=-1), torch.ones(23, 3), atol=1e-5)
    bank.save(tmp_path / "mv.safetensors")
    loaded = NegativeBank.load(tmp_path / "mv.safetensors")
    assert loaded.similarity == "max_token" and torch.equal(loaded.embeddings, bank.embeddings)
    with pytest.raises(ShapeError):
        NegativeBank(torch.zeros(4, 3), ["a", "b", "c", "d"], [0, 1, 2, 3], similarity="max_token", fingerprint="x")


def test_exclusion_rows_mask_reference_not_target(world):
    images, _, _ = world
    ids = list(images)
    bank = NegativeBank.build(make_model(), ids, images, groups={ids[0]: "d", ids[1]: "d"}, show_progress=False)
    triplets = [
        Triplet(ids[2], ("x",), ids[3]),        # plain: mask the reference's row
        Triplet(ids[0], ("x",), ids[1]),        # reference and target are duplicates: nothing masked
        Triplet(ids[1], ("x",), ids[4]),        # reference's row is shared with its duplicate ids[0]
    ]
    rows = exclusion_rows(bank, triplets)
    assert rows.shape == (3, 1) and rows.dtype == torch.long
    assert rows[:, 0].tolist() == [bank.row_of(ids[2]), -1, bank.row_of(ids[0])]


def test_resumable_build_reuses_finished_shards(world, tmp_path):
    images, _, _ = world
    model = make_model()
    ids = list(images)
    full = NegativeBank.build(model, ids, images, batch_size=4, show_progress=False)
    split = probe_split(model, images[ids[0]][None])
    calls = []
    original = model.encode_image

    def dying(x):
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(x)

    model.encode_image = dying
    with pytest.raises(KeyboardInterrupt):
        NegativeBank.build(model, ids, images, batch_size=4, show_progress=False, cache_dir=tmp_path / "shards",
                           split=split)
    calls.clear()
    model.encode_image = lambda x: calls.append(x.shape[0]) or original(x)
    resumed = NegativeBank.build(model, ids, images, batch_size=4, show_progress=False, cache_dir=tmp_path / "shards",
                                 split=split)
    assert sum(calls) == 23 - 8  # the two chunks of 4 finished before the kill were reused
    assert torch.equal(resumed.embeddings, full.embeddings)
    # shards of other weights are ignored
    other = make_model(seed=3)
    other_split = probe_split(other, images[ids[0]][None])
    calls2 = []
    enc = other.encode_image
    other.encode_image = lambda x: calls2.append(x.shape[0]) or enc(x)
    NegativeBank.build(other, ids, images, batch_size=4, show_progress=False, cache_dir=tmp_path / "shards",
                       split=other_split)
    assert sum(calls2) == 23


def test_to_and_load_with_dtype(world, tmp_path):
    images, _, _ = world
    bank = NegativeBank.build(make_model(), list(images), images, show_progress=False)
    assert bank.to("cpu") is bank
    half = bank.to(dtype=torch.bfloat16)
    assert half.embeddings.dtype == torch.bfloat16 and half.ids == bank.ids and half.fingerprint == bank.fingerprint
    assert torch.allclose(half.embeddings.float(), bank.embeddings, atol=1e-2)
    bank.save(tmp_path / "b.safetensors")
    assert NegativeBank.load(tmp_path / "b.safetensors", dtype="bfloat16").embeddings.dtype == torch.bfloat16
    with pytest.raises(DataError, match="no negative bank"):
        NegativeBank.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(DataError, match="not a readable safetensors"):
        NegativeBank.load(tmp_path / "junk.safetensors")
