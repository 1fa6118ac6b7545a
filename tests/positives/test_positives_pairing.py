import math
from unittest import mock

import numpy as np
import pytest
import torch

import cir_plugins.positives.pairing as pairing
from cir_plugins.errors import ConfigError, NonFiniteError, ShapeError
from cir_plugins.positives.pairing import pair_images, parse_rank_window, select_partners


def scalar_key(seed, q, n, j):
    """The documented draw key, one Python integer at a time: splitmix64(seed * 2**40 + q * n + j), signed."""
    z = (seed * 2**40 + q * n + j + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z


def brute_force_windows(emb, window, groups=None, duplicates=None):
    """Full sort of every row (the plain reference): list of window row lists per query."""
    x = emb.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = x @ x.T  # (N, N), fine at test sizes
    n = len(x)
    windows = []
    for i in range(n):
        cands = [j for j in range(n) if j != i
                 and (groups is None or groups[j] == groups[i])
                 and (duplicates is None or duplicates[j] != duplicates[i])]
        ranked = sorted(cands, key=lambda j: (-full[i, j], j))  # cosine desc, ties by index
        m = len(ranked)
        a, b = window
        if a < 0:
            a, b = 0, m
        elif isinstance(a, float):
            a, b = math.floor(a * m), math.floor(b * m)
        windows.append(ranked[min(a, m):min(b, m)])
    return windows


CASES = [
    dict(window=(3, 11)),
    dict(window=(0, 1)),
    dict(window=(0.25, 0.6)),
    dict(window=(-1, 0)),
    dict(window=(40, 1000)),  # clipped past the end
    dict(window=(2, 7), groups=True),
    dict(window=(0.1, 0.5), groups=True, duplicates=True),
    dict(window=(5, 9), duplicates=True),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_drawn_partners_lie_in_brute_force_window(case, chunk_size):
    n, d = 53, 6
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    groups = [["a", "b", "c"][i % 3] for i in range(n)] if case.get("groups") else None
    duplicates = [str(i // 4 if i < 20 else i) for i in range(n)] if case.get("duplicates") else None
    windows = brute_force_windows(emb, case["window"], groups, duplicates)
    picks = select_partners(emb, rank_window=case["window"], partners_per_image=3, seed=5, groups=groups,
                            duplicates=duplicates, chunk_size=chunk_size)
    assert len(picks) == n
    for i, (row, window) in enumerate(zip(picks, windows)):
        assert len(row) == min(3, len(window))
        assert len(set(row)) == len(row)
        assert set(row) <= set(window), (i, row, window)


@pytest.mark.parametrize("case", CASES)
def test_full_draw_equals_window_exactly(case):
    n, d = 41, 5
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    groups = [["x", "y"][i % 2] for i in range(n)] if case.get("groups") else None
    duplicates = [str(i // 3 if i < 12 else i) for i in range(n)] if case.get("duplicates") else None
    windows = brute_force_windows(emb, case["window"], groups, duplicates)
    size = max(len(w) for w in windows)
    picks = select_partners(emb, rank_window=case["window"], partners_per_image=max(size, 1), seed=3,
                            groups=groups, duplicates=duplicates, chunk_size=9)
    for row, window in zip(picks, windows):
        assert sorted(row) == sorted(window)


def test_exact_ties_follow_index_rule():
    # entries +-0.5 after normalisation: every cosine is exact, so ties are real
    gen = torch.Generator().manual_seed(4)
    emb = (torch.randint(0, 2, (37, 4), generator=gen) * 2 - 1).double()
    for window in [(1, 4), (3, 9), (0, 2)]:
        windows = brute_force_windows(emb, window)
        picks = select_partners(emb, rank_window=window, partners_per_image=10, seed=0, chunk_size=5)
        for row, expected in zip(picks, windows):
            assert sorted(row) == sorted(expected)


def test_deterministic_and_chunk_independent_and_seed_sensitive():
    emb = torch.randn(97, 8)
    a = select_partners(emb, rank_window=(5, 40), partners_per_image=2, seed=11, chunk_size=10)
    b = select_partners(emb, rank_window=(5, 40), partners_per_image=2, seed=11, chunk_size=33)
    c = select_partners(emb, rank_window=(5, 40), partners_per_image=2, seed=12, chunk_size=10)
    assert a == b
    assert a != c


def test_query_rows_subset_matches_full_run_rows():
    emb = torch.randn(30, 4)
    rows = [3, 17, 29]
    sub = select_partners(emb, rank_window=(2, 9), partners_per_image=1, query_rows=rows, seed=0)
    windows = brute_force_windows(emb, (2, 9))
    for r, picks in zip(rows, sub):
        assert set(picks) <= set(windows[r]) and len(picks) == 1


def test_pair_images_maps_ids_and_uses_encoder():
    ids = [f"img{i}" for i in range(23)]
    images = {i: torch.randn(3, 4, 4) for i in ids}
    calls = []

    def encoder(batch):
        calls.append(batch.shape[0])
        return batch.flatten(1)[:, :10]  # (n, 10)

    result = pair_images(encoder, ids, images, rank_window=(0.0, 0.5), seed=0, batch_size=8,
                         duplicates={i: ("dup" if i in ("img0", "img1") else i) for i in ids})
    assert calls == [8, 8, 7]
    assert set(result.partners) == set(ids)
    assert "img1" not in result.partners["img0"] and "img0" not in result.partners["img1"]
    for qid, partners in result.partners.items():
        assert len(partners) == 1 and partners[0] != qid and partners[0] in images


def test_bad_windows_and_inputs_are_clear_errors():
    for bad in [(5, 5), (0.5, 0.2), (1, 0.5), (0.2, 1.5), "x,y", (1,), (True, 3)]:
        with pytest.raises(ConfigError):
            parse_rank_window(bad)
    assert parse_rank_window("10000,15000").start == 10000
    assert parse_rank_window("0.2,0.3").is_fraction
    assert parse_rank_window((-1, 0)).is_any
    with pytest.raises(ConfigError, match="rank_window"):
        select_partners(torch.randn(10, 3), rank_window=(5, 2))
    with pytest.raises(ShapeError, match="2-D"):
        select_partners(torch.randn(5), rank_window=(0, 2))
    with pytest.raises(ShapeError, match="groups"):
        select_partners(torch.randn(10, 3), rank_window=(0, 2), groups=[0, 1])
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        select_partners(bad, rank_window=(0, 2))
    with pytest.raises(ConfigError, match="partners_per_image"):
        select_partners(torch.randn(5, 3), rank_window=(0, 2), partners_per_image=0)
    with pytest.raises(ConfigError, match="query_rows"):
        select_partners(torch.randn(10, 3), rank_window=(0, 2), query_rows=[10])


def test_non_finite_encoder_output_names_the_images():
    images = {f"p{k}": torch.full((3, 2, 2), float(k)) for k in range(5)}

    def encoder(batch):
        out = batch.flatten(1).clone()
        out[batch.flatten(1)[:, 0] == 3.0] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="p3") as caught:
        pair_images(encoder, list(images), images, rank_window=(0, 2), batch_size=2)
    assert "p2" not in str(caught.value)


@pytest.mark.parametrize("window", [(3, 11), (0, 4), (0.2, 0.55)])
def test_draw_is_the_smallest_hash_keys_of_the_brute_force_window(window):
    # the documented draw rule, checked against a plain reference: per query, the window members
    # (brute-force full sort) ordered by the scalar splitmix64 key, first partners_per_image of them
    n, d = 47, 5
    emb = torch.randn(n, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    windows = brute_force_windows(emb, window)
    for chunk_size in (4, 47):
        picks = select_partners(emb, rank_window=window, partners_per_image=3, seed=13, chunk_size=chunk_size)
        for q, (row, members) in enumerate(zip(picks, windows)):
            assert row == sorted(members, key=lambda j: scalar_key(13, q, n, j))[:3]


def test_draw_rule_holds_with_ties_at_the_a_boundary():
    # +-1 entries: many exact ties, so some rows hold more values equal to a boundary score than the window
    # can take and the tie rule decides; still the reference rule
    emb = (torch.randint(0, 2, (31, 3), generator=torch.Generator().manual_seed(6)) * 2 - 1).double()
    windows = brute_force_windows(emb, (2, 6))
    picks = select_partners(emb, rank_window=(2, 6), partners_per_image=2, seed=1, chunk_size=8)
    for q, (row, members) in enumerate(zip(picks, windows)):
        assert row == sorted(members, key=lambda j: scalar_key(1, q, 31, j))[:2]


def test_distinct_scores_match_the_reference():
    # distinct random scores: every row holds exactly b - a members
    emb = torch.randn(59, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    windows = brute_force_windows(emb, (4, 13))
    picks = select_partners(emb, rank_window=(4, 13), partners_per_image=2, seed=2, chunk_size=11)
    for q, (row, members) in enumerate(zip(picks, windows)):
        assert row == sorted(members, key=lambda j: scalar_key(2, q, 59, j))[:2]


def _torch_blocks(monkeypatch, emb, **kwargs):
    """select_partners through its torch per-block path (the one a GPU takes), on the CPU."""
    monkeypatch.setattr(pairing, "_NUMPY_ON_CPU", False)
    try:
        return select_partners(emb, **kwargs)
    finally:
        monkeypatch.setattr(pairing, "_NUMPY_ON_CPU", True)


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


@pytest.mark.parametrize("window", [(3, 29), (0, 1), (0, 9), (12, 13), (40, 1000), (0.2, 0.45), (0.5, 1.0),
                                    (0.59, 0.886), (-1, 0)])
def test_numpy_rows_and_torch_blocks_give_the_same_partners(monkeypatch, window):
    # the two selection paths (numpy per row, rows spread over 2 threads; torch per block, as on a GPU) on
    # random, tied, duplicated, quantised and grouped inputs at odd sizes, each with several seeds, chunk sizes, k
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for name, emb, extra in _inputs():
        for seed, chunk, k in [(4, 5, 3), (4, 70, 3), (0, 7, 1), (2**31 + 5, 256, 2)]:
            kwargs = dict(rank_window=window, partners_per_image=k, seed=seed, chunk_size=chunk, **extra)
            assert select_partners(emb, **kwargs) == _torch_blocks(monkeypatch, emb, **kwargs), (name, seed, chunk, k)


def test_both_paths_match_the_brute_force_reference(monkeypatch):
    for numpy_rows in (True, False):
        monkeypatch.setattr(pairing, "_NUMPY_ON_CPU", numpy_rows)
        emb = torch.randn(67, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        windows = brute_force_windows(emb, (6, 21))
        picks = select_partners(emb, rank_window=(6, 21), partners_per_image=4, seed=3, chunk_size=67)
        for q, (row, members) in enumerate(zip(picks, windows)):
            assert row == sorted(members, key=lambda j: scalar_key(3, q, 67, j))[:4]
        emb = (torch.randint(0, 2, (40, 3), generator=torch.Generator().manual_seed(2)) * 2 - 1).double()
        windows = brute_force_windows(emb, (2, 9))
        picks = select_partners(emb, rank_window=(2, 9), partners_per_image=2, seed=1, chunk_size=40)
        for q, (row, members) in enumerate(zip(picks, windows)):  # tied boundaries: the tie rule
            assert row == sorted(members, key=lambda j: scalar_key(1, q, 40, j))[:2]


def test_query_rows_and_unnormalised_input_match(monkeypatch):
    emb = torch.randn(77, 5, generator=torch.Generator().manual_seed(1))
    kwargs = dict(rank_window=(0.1, 0.7), partners_per_image=2, seed=9, query_rows=[76, 3, 3, 40], chunk_size=3)
    picks = select_partners(emb, **kwargs)
    assert picks == _torch_blocks(monkeypatch, emb, **kwargs)
    assert picks[1] == picks[2] == select_partners(emb, **{**kwargs, "query_rows": [3]})[0]  # rows are independent
    kwargs = dict(rank_window=(4, 30), normalize=False)
    assert select_partners(emb, **kwargs) == _torch_blocks(monkeypatch, emb, **kwargs)


def test_large_seeds_and_wide_windows_follow_the_draw_rule():
    # +-1 rows (D = 4): every cosine is exact, ties included; a seed past 2**40 and a window over most of the row
    emb = (torch.randint(0, 2, (45, 4), generator=torch.Generator().manual_seed(6)) * 2 - 1).double()
    for window, seed in [((2, 9), 1), ((0, 30), 2**40 + 3)]:
        picks = select_partners(emb, rank_window=window, partners_per_image=3, seed=seed, chunk_size=8)
        for q, (row, members) in enumerate(zip(picks, brute_force_windows(emb, window))):
            assert row == sorted(members, key=lambda j: scalar_key(seed, q, 45, j))[:3]


def test_hash_forms_match_the_scalar_key():
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_inputs_device_with_the_same_partners():
    emb = torch.randn(3001, 32, generator=torch.Generator().manual_seed(2)).to("cuda")  # the device under test
    for window in [(0.590, 0.886), (10, 200)]:
        kwargs = dict(rank_window=window, partners_per_image=2, seed=5, groups=[i % 4 for i in range(3001)])
        assert select_partners(emb, **kwargs) == select_partners(emb.cpu(), **kwargs)


class _DeviceCheckingEncoder(torch.nn.Module):
    """Records the device of each batch; its weights live on ``device`` (meta: no memory, any box)."""

    def __init__(self, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, device=device))
        self.seen = []

    def encode_image(self, images):
        self.seen.append(images.device)
        return torch.ones(images.shape[0], 2)  # on the CPU, as a model may return


def test_embed_images_moves_batches_to_the_encoders_device():
    from cir_plugins import embedding
    from cir_plugins._utils import model_device

    images = {f"i{k}": torch.rand(3, 4, 4) for k in range(5)}
    cpu_enc = _DeviceCheckingEncoder("cpu")
    assert model_device(cpu_enc.encode_image, default=None) == torch.device("cpu")  # a bound method
    assert model_device(cpu_enc, default=None) == torch.device("cpu")  # the module itself
    assert model_device(_DeviceCheckingEncoder("meta").encode_image, default=None) is None  # offloaded weights
    assert model_device(torch.nn.ReLU(), default=None) is None  # no parameters
    assert model_device(lambda x: x, default=None) is None  # no module
    assert model_device(lambda x: x) == torch.device("cpu")  # the default default
    # the move itself: batches go to whatever device the encoder reports (meta needs no memory)
    enc = _DeviceCheckingEncoder("cpu")
    with mock.patch.object(embedding, "model_device", return_value=torch.device("meta")):
        out = embedding.embed_images(enc.encode_image, list(images), images, batch_size=2, output_device="cpu")
    assert out.shape == (5, 2) and out.device.type == "cpu"
    assert [d.type for d in enc.seen] == ["meta"] * 3
    seen = []
    embedding.embed_images(lambda x: seen.append(x.device) or torch.ones(x.shape[0], 2), list(images), images)
    assert [d.type for d in seen] == ["cpu"]


def test_pair_embeddings_pools_tokens_into_float32_cpu_rows():
    from cir_plugins import embedding

    images = {f"i{k}": torch.rand(3, 4, 4) for k in range(5)}

    def tokens(x):  # (n, 3, 4, 4) -> (n, 3, 16): a multi-vector encoder
        return x.flatten(2).double()

    pooled = pairing.pair_embeddings(tokens, list(images), images, batch_size=2)
    assert pooled.dtype == torch.float32 and pooled.shape == (5, 16)  # pooled over tokens, float32
    new = embedding.embed_images(tokens, list(images), images, batch_size=2, show_progress=False)
    assert torch.allclose(pooled, new.mean(dim=1).float())
