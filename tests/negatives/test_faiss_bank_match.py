"""A FAISS index is accepted only for the bank it was built from (its checksum and id -> row map), its digest covers
the .json sidecar, every malformed sidecar entry is a DataError naming it; kind "auto" is exact on a small bank, and a
compressed index reports its recall against exact search when built."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

faiss = pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')

from cir_plugins.errors import BankMismatchError, DataError  # noqa: E402
from cir_plugins.negatives import faiss_index as fi  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.negatives.faiss_index import FaissIndex, _digest, build_faiss_index  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _bank(n=40, d=8, seed=0, order=None):
    emb = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    ids = [f"img{i}" for i in range(n)]
    if order is not None:  # the same images in another row order
        emb, ids = emb[order], [ids[i] for i in order]
    return NegativeBank(emb, ids, list(range(n)), similarity="dot", fingerprint="fp-same-model")


def test_an_index_of_the_same_split_in_another_order_is_refused():
    bank = _bank()
    reverse = _bank(order=list(range(39, -1, -1)))  # same model, same images, same row count: only the map differs
    index = build_faiss_index(reverse, "flat")
    assert (index.fingerprint, len(index)) == (bank.fingerprint, len(bank))  # what the old check compared
    with pytest.raises(BankMismatchError, match="not exported from this bank"):
        index.check_bank(bank)
    build_faiss_index(bank, "flat").check_bank(bank)  # its own bank passes


def _saved(tmp_path):
    bank = _bank()
    path = build_faiss_index(bank, "flat").save(tmp_path / "g.faiss")
    return bank, path, path.with_name("g.faiss.json")


def _rewrite(meta_path, edit, *, keep_digest=False):
    meta = json.loads(meta_path.read_text())
    edit(meta)
    if not keep_digest:  # a sidecar edited by a tool that also recomputed the digest
        meta["index_digest"] = _digest(meta_path.with_name(meta_path.name[:-5]).read_bytes(), meta)
    meta_path.write_text(json.dumps(meta))


def test_the_digest_covers_the_sidecar(tmp_path):
    bank, path, meta_path = _saved(tmp_path)
    _rewrite(meta_path, lambda m: m["ids"].reverse(), keep_digest=True)
    with pytest.raises(DataError, match="digest"):
        FaissIndex.load(path)


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.pop("rows"), "'rows' is malformed"),
    (lambda m: m.update(rows="40"), "'rows' is malformed"),
    (lambda m: m["id_rows"].__setitem__(0, 400), "'id_rows' is malformed"),
    (lambda m: m["id_rows"].__setitem__(0, -1), "'id_rows' is malformed"),
    (lambda m: m["ids"].pop(), "'id_rows' is malformed"),
    (lambda m: m.update(ids=m["ids"][:1] * len(m["ids"])), "'ids' is malformed"),
    (lambda m: m.update(ids={"a": 1}), "'ids' is malformed"),
    (lambda m: m.update(nprobe=0), "'nprobe' is malformed"),
    (lambda m: m.pop("bank_checksum"), "'bank_checksum' is malformed"),
    (lambda m: m.update(recall="high"), "'recall' is malformed"),
])
def test_every_malformed_sidecar_entry_is_a_data_error_naming_it(tmp_path, edit, words):
    _, path, meta_path = _saved(tmp_path)
    _rewrite(meta_path, edit)
    with pytest.raises(DataError, match=words):
        FaissIndex.load(path)


def test_shuffled_ids_with_a_recomputed_digest_load_but_are_refused_for_the_bank(tmp_path):
    bank, path, meta_path = _saved(tmp_path)
    _rewrite(meta_path, lambda m: m["ids"].reverse())
    with pytest.raises(BankMismatchError):
        FaissIndex.load(path).check_bank(bank)
    assert FaissIndex.load(path).ids[0] == "img39"


def test_other_versions_and_unreadable_sidecars_are_clear(tmp_path):
    _, path, meta_path = _saved(tmp_path)
    _rewrite(meta_path, lambda m: m.update(version="1"))
    with pytest.raises(DataError, match="another version"):
        FaissIndex.load(path)
    meta_path.write_text("[" * 100_000)
    with pytest.raises(DataError, match="not readable JSON"):
        FaissIndex.load(path)


def test_auto_is_exact_below_the_threshold_and_a_compressed_index_reports_its_recall(tmp_path, monkeypatch, caplog):
    bank = _bank(n=600, d=16, seed=3)
    small = build_faiss_index(bank)  # the default kind: "auto"
    assert (small.kind, small.factory, small.recall) == ("flat", "Flat", None)
    monkeypatch.setattr(fi, "FLAT_BELOW", 500)
    with caplog.at_level(logging.INFO, logger="cir_plugins.negatives.faiss_index"):
        big = build_faiss_index(bank, recall_queries=64)
    assert big.kind == "ivfpq" and big.factory.startswith("IVF15,")  # 600 // 39 lists: no under-trained clusters
    assert big.recall["k"] == 10 and big.recall["queries"] == 64 and big.recall["nprobe"] == big.nprobe
    assert 0.0 < big.recall["recall"] <= 1.0
    assert any("recall@10" in r.getMessage() and "against exact search" in r.getMessage() for r in caplog.records)
    # the measurement is what it says: the mean share of the exact top-10 of each sampled row found by the index
    assert big.measure_recall(bank.embeddings, queries=64)["recall"] == big.recall["recall"]
    assert build_faiss_index(bank, "flat").measure_recall(bank.embeddings, queries=64)["recall"] == 1.0
    loaded = FaissIndex.load(big.save(tmp_path / "c.faiss"))
    assert loaded.recall == big.recall and "recall@10=" in repr(loaded)
    assert build_faiss_index(bank, recall_queries=0).recall is None
