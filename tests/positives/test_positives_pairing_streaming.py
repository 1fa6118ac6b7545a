import numpy as np
import pytest
import torch
from test_positives_pairing import scalar_key

import cir_plugins.positives.pairing as pairing
from cir_plugins.errors import ConfigError, NonFiniteError, ShapeError
from cir_plugins.positives.pairing import select_partners

WINDOWS = [(3, 29), (0, 1), (0, 9), (12, 13), (40, 1000), (0.2, 0.45), (0.5, 1.0), (0.59, 0.886), (-1, 0)]


def _inputs():
    gen = torch.Generator().manual_seed(11)
    dup_rows = torch.randn(97, 5, generator=gen)
    dup_rows[10:30] = dup_rows[3]  # duplicated rows: tied scores at many ranks
    quantised = torch.round(torch.randn(89, 4, generator=gen) * 2) / 2  # few distinct cosines
    return [
        ("random f64", torch.randn(131, 7, generator=gen, dtype=torch.float64), {}),
        ("random f32", torch.randn(149, 4, generator=gen), {}),
        ("+-1 ties", (torch.randint(0, 2, (83, 3), generator=gen) * 2 - 1).float(), {}),
        ("integer ties", torch.randint(-2, 3, (101, 2), generator=gen).double(), {}),
        ("duplicate rows", dup_rows, {}),
        ("quantised", quantised, {}),
        ("groups", torch.randn(121, 6, generator=gen), dict(groups=[i % 3 for i in range(121)])),
        ("groups+dups", torch.randn(113, 6, generator=gen),
         dict(groups=[i % 2 for i in range(113)], duplicates=[str(i // 5) for i in range(113)])),
        ("dups, quantised", quantised, dict(duplicates=[i // 3 for i in range(89)])),
    ]


def _torch_blocks(monkeypatch, emb, **kwargs):
    """select_partners through its torch per-block path (the one a GPU takes), on the CPU."""
    monkeypatch.setattr(pairing, "_NUMPY_ON_CPU", False)
    try:
        return select_partners(emb, **kwargs)
    finally:
        monkeypatch.setattr(pairing, "_NUMPY_ON_CPU", True)


@pytest.mark.parametrize("window", WINDOWS)
def test_numpy_rows_and_torch_blocks_give_the_same_partners(monkeypatch, window):
    # the two selection paths (numpy per row; torch per block as on a GPU): random, tied, duplicated,
    # quantised and grouped inputs at odd sizes, several seeds, chunk sizes and k
    for (name, emb, extra), (seed, chunk, k) in zip(_inputs() * 2, [(0, 7, 1), (4, 64, 3), (2**31 + 5, 256, 2)] * 6):
        kwargs = dict(rank_window=window, partners_per_image=k, seed=seed, chunk_size=chunk, **extra)
        assert select_partners(emb, **kwargs) == _torch_blocks(monkeypatch, emb, **kwargs), (name, seed, chunk, k)


def test_query_rows_and_unnormalised_input_match(monkeypatch):
    emb = torch.randn(77, 5, generator=torch.Generator().manual_seed(1))
    kwargs = dict(rank_window=(0.1, 0.7), partners_per_image=2, seed=9, query_rows=[76, 3, 3, 40], chunk_size=3)
    picks = select_partners(emb, **kwargs)
    assert picks == _torch_blocks(monkeypatch, emb, **kwargs)
    assert picks[1] == picks[2] == select_partners(emb, **{**kwargs, "query_rows": [3]})[0]  # rows are independent
    kwargs = dict(rank_window=(4, 30), normalize=False)
    assert select_partners(emb, **kwargs) == _torch_blocks(monkeypatch, emb, **kwargs)


def test_draw_is_the_smallest_keys_of_the_brute_force_window():
    # plain reference: every cosine of +-1 rows (D = 4) is exact, so the full sort by (-cosine, index) is the
    # ranking with its ties; the draw is the window members ordered by the scalar splitmix64 key
    emb = (torch.randint(0, 2, (45, 4), generator=torch.Generator().manual_seed(6)) * 2 - 1).double()
    n, cos = 45, (emb @ emb.T / 4).numpy()
    for window, seed in [((2, 9), 1), ((0, 30), 2**40 + 3)]:
        picks = select_partners(emb, rank_window=window, partners_per_image=3, seed=seed, chunk_size=8)
        for q, row in enumerate(picks):
            ranked = sorted((j for j in range(n) if j != q), key=lambda j: (-cos[q, j], j))
            members = ranked[window[0]:window[1]]
            assert row == sorted(members, key=lambda j: scalar_key(seed, q, n, j))[:3]


def test_hash_forms_match_thescalar_key():
    js = np.array([0, 1, 7, 99_999, 2**40], dtype=np.int64)
    for seed, q, n in [(0, 0, 10), (7, 5, 100_003), (2**31 + 5, 99_999, 100_003)]:
        offset = pairing._key_offset(seed, q, n)
        want = [scalar_key(seed, q, n, int(j)) for j in js]
        assert pairing._splitmix(js.astype(np.uint64) + np.uint64(offset)).tolist() == want
        signed = offset - 2**64 if offset >= 2**63 else offset
        assert pairing._splitmix(torch.from_numpy(js) + signed).tolist() == want


def test_both_paths_agree_at_20k(monkeypatch):
    # N = 20,000, the release window (0.590, 0.886); the equality with the selection this one replaced was
    # measured at this size (benchmarks/pairing_streaming.json)
    emb = torch.randn(20_000, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(rank_window=(0.590, 0.886), partners_per_image=2, seed=3, query_rows=range(0, 20_000, 7))
    got = select_partners(emb, **kwargs)
    assert len(got) == len(range(0, 20_000, 7)) and all(len(row) == 2 for row in got)
    assert got == _torch_blocks(monkeypatch, emb, **kwargs)


def test_bad_inputs_are_clear_errors():
    emb = torch.randn(10, 3)
    with pytest.raises(ConfigError, match="rank_window"):
        select_partners(emb, rank_window=(5, 2))
    with pytest.raises(ShapeError, match="2-D"):
        select_partners(emb[0], rank_window=(0, 2))
    with pytest.raises(ShapeError, match="groups"):
        select_partners(emb, rank_window=(0, 2), groups=[0, 1])
    with pytest.raises(ConfigError, match="partners_per_image"):
        select_partners(emb, rank_window=(0, 2), partners_per_image=0)
    with pytest.raises(ConfigError, match="query_rows"):
        select_partners(emb, rank_window=(0, 2), query_rows=[10])
    with pytest.raises(NonFiniteError):
        select_partners(emb.index_fill(0, torch.tensor([4]), float("nan")), rank_window=(0, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_inputs_device_with_the_same_partners():
    emb = torch.randn(3001, 32, generator=torch.Generator().manual_seed(2)).to("cuda")  # the device under test
    for window in [(0.590, 0.886), (10, 200)]:
        kwargs = dict(rank_window=window, partners_per_image=2, seed=5, groups=[i % 4 for i in range(3001)])
        assert select_partners(emb, **kwargs) == select_partners(emb.cpu(), **kwargs)
