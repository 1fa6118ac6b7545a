"""FAISS export of a bank: the exact index equals metrics.topk_rows on random data (with exclusions), the
compressed index keeps most of the exact top-k on a small clustered set, save/load round-trips and
refuses a mismatched file."""

import json

import pytest
import torch
import torch.nn.functional as F

faiss = pytest.importorskip("faiss", reason='FAISS is an optional extra: pip install "cir-plugins[faiss]"')

from cir_plugins.errors import ConfigError, DataError, DTypeError, ShapeError  # noqa: E402
from cir_plugins.metrics import topk_rows  # noqa: E402
from cir_plugins.negatives.bank import NegativeBank  # noqa: E402
from cir_plugins.negatives.faiss_index import FaissIndex, build_faiss_index  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _bank(n=301, d=24, seed=0, duplicates=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    ids = [f"img{i}" for i in range(n)] + [f"copy{i}" for i in range(duplicates)]
    rows = list(range(n)) + list(range(duplicates))  # copy{i} shares row i
    return NegativeBank(emb, ids, rows, similarity="dot", fingerprint="fp-test")


@pytest.mark.parametrize("n,d,k", [(301, 24, 10), (97, 7, 97), (1000, 64, 50)])
def test_flat_equals_topk_rows(n, d, k):
    bank = _bank(n, d, seed=n)
    index = build_faiss_index(bank, "flat")
    query = F.normalize(torch.randn(13, d, generator=torch.Generator().manual_seed(1)), dim=1)
    scores, rows = index.search(query, k)
    ref_scores, ref_rows = topk_rows(query, bank.embeddings, k)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)


def test_flat_exclusions_equal_topk_rows():
    bank = _bank(200, 16, seed=3)
    index = build_faiss_index(bank, "flat")
    query = F.normalize(torch.randn(9, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    _, best = topk_rows(query, bank.embeddings, 4)
    exclude = torch.full((9, 3), -1, dtype=torch.long)
    exclude[:, 0] = best[:, 0]  # the best row of every query
    exclude[::2, 1] = best[::2, 2]  # and the third for every other query
    exclude[1, 2] = 150
    scores, rows = index.search(query, 20, exclude_rows=exclude)
    ref_scores, ref_rows = topk_rows(query, bank.embeddings, 20, exclude_rows=exclude)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    # all but one row excluded for a tiny bank: the tail is -inf / -1, as topk_rows gives it
    small = _bank(5, 4, seed=4)
    q = F.normalize(torch.randn(1, 4), dim=1)
    ex = torch.tensor([[0, 1, 2, 3]])
    s, r = build_faiss_index(small, "flat").search(q, 3, exclude_rows=ex)
    ref_s, ref_r = topk_rows(q, small.embeddings, 3, exclude_rows=ex)
    assert r.tolist() == ref_r.tolist() == [[4, -1, -1]]
    assert torch.isinf(s[0, 1:]).all() and torch.isinf(ref_s[0, 1:]).all()


def _clustered(n=4000, d=32, centers=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centers, d, generator=g), dim=1)
    x = c[torch.randint(centers, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g) / d ** 0.5
    return F.normalize(x, dim=1)


def test_ivfpq_recall_against_exact():
    emb = _clustered(n=1500)
    bank = NegativeBank(emb, [str(i) for i in range(len(emb))], list(range(len(emb))), similarity="dot",
                        fingerprint="fp")
    query = F.normalize(emb[:100] + 0.05 * torch.randn(100, emb.shape[1], generator=torch.Generator().manual_seed(5)),
                        dim=1)
    _, exact = topk_rows(query, emb, 10)
    index = build_faiss_index(bank, "ivfpq", nlist=8, m=16, nbits=4, nprobe=8)
    assert index.factory == "IVF8,PQ16x4fs" and index.nprobe == 8
    _, approx = index.search(query, 50)

    def recall(found):  # share of the exact top-10 found
        return sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(found, exact)) / exact.numel()

    # 8 bytes a row instead of 128: the exact top-10 is mostly in the compressed top-50 (chance: 50/1500)
    assert recall(approx) >= 0.9, recall(approx)
    assert recall(approx[:, :10]) >= 0.3, recall(approx[:, :10])  # chance: 10/1500
    assert index.memory_bytes() < build_faiss_index(bank, "flat").memory_bytes() / 4


def test_save_load_round_trip_and_mismatch(tmp_path):
    bank = _bank(120, 16, seed=9, duplicates=3)
    index = build_faiss_index(bank, "ivfpq", nlist=4, m=4, nbits=4, nprobe=4)
    path = index.save(tmp_path / "gallery.faiss")
    loaded = FaissIndex.load(path)
    assert (loaded.kind, loaded.factory, loaded.nprobe, loaded.fingerprint) == ("ivfpq", "IVF4,PQ4x4fs", 4, "fp-test")
    assert sorted(loaded.ids_of_row(0)) == ["copy0", "img0"]
    q = bank.embeddings[:5]
    for a, b in zip(index.search(q, 7), loaded.search(q, 7)):
        assert torch.equal(a, b)
    meta = json.loads((tmp_path / "gallery.faiss.json").read_text())
    assert meta["format"] == "cir_plugins.faiss_index" and meta["rows"] == 120
    other = build_faiss_index(_bank(120, 16, seed=10), "flat")
    (tmp_path / "gallery.faiss").write_bytes(faiss.serialize_index(other.index).tobytes())
    with pytest.raises(DataError, match="digest"):
        FaissIndex.load(path)
    with pytest.raises(DataError, match="no FAISS index"):
        FaissIndex.load(tmp_path / "absent.faiss")


def test_bad_inputs():
    bank = _bank(50, 8)
    with pytest.raises(ConfigError, match="kind"):
        build_faiss_index(bank, "hnsw")
    multi = NegativeBank(F.normalize(torch.randn(6, 3, 8), dim=-1), [str(i) for i in range(6)], list(range(6)),
                         similarity="max_token", fingerprint="x")
    with pytest.raises(ConfigError, match="single-vector"):
        build_faiss_index(multi)
    index = build_faiss_index(bank, "flat")
    with pytest.raises(ShapeError):
        index.search(torch.randn(3, 9), 5)
    with pytest.raises(ConfigError, match="k must"):
        index.search(torch.randn(3, 8), 51)
    # exclude_rows: the metrics' checks (shape, dtype, range) with the metrics' errors
    with pytest.raises(ShapeError, match="exclude_rows must be"):
        index.search(torch.randn(3, 8), 5, exclude_rows=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(DTypeError, match="exclude_rows must be an int64"):
        index.search(torch.randn(3, 8), 5, exclude_rows=torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ShapeError, match="exclude_rows out of range"):
        index.search(torch.randn(3, 8), 5, exclude_rows=torch.tensor([[0], [50], [-1]]))
    with pytest.raises(ConfigError, match="IVF"):
        index.set_nprobe(4)
    with pytest.raises(ConfigError, match="factory"):
        build_faiss_index(bank, factory="NotAnIndex77")
    with pytest.raises(ConfigError, match="could not train"):
        build_faiss_index(bank, "ivfpq", m=4, nbits=8)  # 50 rows for 256 codes
    with pytest.raises(ConfigError, match="even"):
        build_faiss_index(bank, "ivfpq", m=1)
    with pytest.raises(ConfigError, match="divide"):
        build_faiss_index(bank, "ivfpq", m=3)
