"""retrieval_metrics / topk_rows: closed-form recalls from hand-built embeddings, and a naive full sort."""

import pytest
import torch

import cir_plugins as cp
from cir_plugins import metrics as M
from cir_plugins import similarity as S
from cir_plugins.errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError


def one_hot_world(score_matrix):
    """query i = e_i, gallery row j = score_matrix[:, j]: score(i, j) = score_matrix[i, j] exactly.

    score_matrix (Q, G) of small integers. Returns query (Q, Q), gallery (G, Q).
    """
    q = score_matrix.shape[0]
    return torch.eye(q), score_matrix.T.contiguous().float()


def world_with_ranks(ranks, n_gallery, seed=0):
    """Scores where query i's target has exactly ranks[i] strictly better candidates (no ties)."""
    g = torch.Generator().manual_seed(seed)
    q = len(ranks)
    scores = torch.full((q, n_gallery), -1.0)
    targets = torch.empty(q, dtype=torch.long)
    for i, r in enumerate(ranks):
        perm = torch.randperm(n_gallery, generator=g)
        targets[i] = perm[0]
        scores[i, perm[0]] = 0.0
        scores[i, perm[1:1 + r]] = 1.0 + torch.arange(r, dtype=torch.float32)  # r rows above the target
    return scores, targets


RANKS = [0, 0, 1, 3, 4, 4, 7, 9, 20, 60]


@pytest.mark.parametrize("chunk_size", [None, 1, 13])
def test_closed_form_recalls(chunk_size):
    scores, targets = world_with_ranks(RANKS, 97)
    query, gallery = one_hot_world(scores)
    got = cp.retrieval_metrics(query, gallery, targets, chunk_size=chunk_size)
    assert got == {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "R@50": 90.0}
    assert M.target_ranks(query, gallery, targets, chunk_size=chunk_size).tolist() == RANKS


def test_closed_form_recalls_max_token():
    scores, targets = world_with_ranks(RANKS, 97, seed=1)
    query, gallery = one_hot_world(scores)  # (G, D)
    g = torch.Generator().manual_seed(2)
    tokens = gallery[:, None, :] - 2.0 - torch.rand(97, 4, gallery.shape[1], generator=g).round()  # (G, 4, D) lower
    winner = torch.randint(0, 4, (97,), generator=g)
    tokens[torch.arange(97), winner] = gallery  # the max over tokens is exactly the designed score
    got = cp.retrieval_metrics(query, tokens, targets, ks=(1, 5, 10), similarity="max_token", chunk_size=9)
    assert got == {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0}


def test_tie_rule_lower_row_first():
    # target row 50 scores 0; rows 10 and 20 tie with it (come first), row 70 ties but comes after;
    # row 90 is strictly higher.
    scores = torch.full((1, 100), -1.0)
    scores[0, [10, 20, 50, 70]] = 0.0
    scores[0, 90] = 1.0
    query, gallery = one_hot_world(scores)
    target = torch.tensor([50])
    assert M.target_ranks(query, gallery, target, chunk_size=7).tolist() == [3]
    assert cp.retrieval_metrics(query, gallery, target, ks=(3, 4)) == {"R@3": 0.0, "R@4": 100.0}
    values, rows = M.topk_rows(query, gallery, 5, chunk_size=7)
    assert rows.tolist() == [[90, 10, 20, 50, 70]] and values.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_negative_and_signed_zero_scores_order_correctly():
    scores = torch.tensor([[-0.0, 0.0, -1.5, -0.25, 2.0, -3.0, 0.0]])
    query, gallery = torch.ones(1, 1), scores.T.contiguous()
    values, rows = M.topk_rows(query, gallery, 7, chunk_size=3)
    assert rows.tolist() == [[4, 0, 1, 6, 3, 2, 5]]  # -0.0 and 0.0 tie: lower row first
    assert values.tolist() == [[2.0, 0.0, 0.0, 0.0, -0.25, -1.5, -3.0]]


def test_reference_removal_closed_form():
    scores, targets = world_with_ranks(RANKS, 97, seed=3)
    query, gallery = one_hot_world(scores)
    # query 3 (rank 3): remove two of its better rows -> rank 1; query 8 (rank 20): remove 15 -> rank 5;
    # query 0 removes a worse row -> unchanged; the rest remove nothing.
    exclude = torch.full((10, 15), -1, dtype=torch.long)
    better = lambda i: (scores[i] > scores[i, targets[i]]).nonzero().flatten()  # noqa: E731
    exclude[3, :2] = better(3)[:2]
    exclude[8, :15] = better(8)[:15]
    exclude[0, 0] = (scores[0] < 0).nonzero()[0, 0]
    want = list(RANKS)
    want[3], want[8] = 1, 5
    assert M.target_ranks(query, gallery, targets, exclude_rows=exclude, chunk_size=11).tolist() == want
    got = cp.retrieval_metrics(query, gallery, targets, exclude_rows=exclude, ks=(1, 2, 6))
    assert got == {"R@1": 20.0, "R@2": 40.0, "R@6": 70.0}
    _, rows = M.topk_rows(query, gallery, 20, exclude_rows=exclude)
    assert not set(rows[8].tolist()) & set(exclude[8, :15].tolist())


def test_subsets_and_rmean_closed_form():
    scores, targets = world_with_ranks([0, 2, 5, 30], 60, seed=4)
    query, gallery = one_hot_world(scores)
    better = lambda i: (scores[i] > scores[i, targets[i]]).nonzero().flatten().tolist()  # noqa: E731
    worse = lambda i: (scores[i] < scores[i, targets[i]]).nonzero().flatten().tolist()  # noqa: E731
    t = targets.tolist()
    subset = torch.tensor([
        [worse(0)[0], t[0], worse(0)[1], -1, -1],            # rank 0 in subset
        [better(1)[0], t[1], better(1)[1], worse(1)[0], -1],  # rank 2
        [better(2)[0], better(2)[0], t[2], -1, -1],          # duplicate counted once: rank 1
        [better(3)[0], better(3)[1], better(3)[2], t[3], worse(3)[0]],  # rank 3, but one is excluded below
    ])
    exclude = torch.full((4, 1), -1, dtype=torch.long)
    exclude[3, 0] = better(3)[1]  # also removed from the full ranking: full rank 29
    assert M.subset_ranks(query, gallery, targets, subset, exclude_rows=exclude).tolist() == [0, 2, 1, 2]
    got = cp.retrieval_metrics(query, gallery, targets, ks=(1, 5, 10, 50), exclude_rows=exclude, subset_rows=subset)
    assert got == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "R@50": 100.0,
                   "Rs@1": 25.0, "Rs@2": 50.0, "Rs@3": 100.0, "Rmean": (50.0 + 25.0) / 2}
    # Rmean needs R@5 and Rs@1 even when they are not asked for
    only = cp.retrieval_metrics(query, gallery, targets, ks=(10,), subset_rows=subset, subset_ks=(3,),
                                exclude_rows=exclude)
    assert only == {"R@10": 75.0, "Rs@3": 100.0, "Rmean": 37.5}


def naive_order(scores_row, excluded):
    """Full sort: candidate rows ordered by (score desc, row asc), excluded rows dropped."""
    rows = [j for j in range(len(scores_row)) if j not in excluded]
    return sorted(rows, key=lambda j: (-float(scores_row[j]), j))


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
@pytest.mark.parametrize("chunk_size", [None, 1, 17])
def test_random_integer_embeddings_match_naive_sort(similarity, chunk_size, monkeypatch):
    monkeypatch.setattr(M, "QUERY_BLOCK", 5)  # several query blocks too
    g = torch.Generator().manual_seed(7)
    n_q, n_g, d, t = 23, 211, 5, 3
    query = torch.randint(-2, 3, (n_q, d), generator=g).float()  # integer scores: exact, many ties
    shape = (n_g, d) if similarity == "dot" else (n_g, t, d)
    gallery = torch.randint(-2, 3, shape, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, n_g, (n_q,), generator=g)
    exclude = torch.randint(-1, n_g, (n_q, 4), generator=g)
    exclude[exclude == targets[:, None]] = -1
    full = query @ gallery.float().T if similarity == "dot" else \
        torch.einsum("qd,gtd->qgt", query, gallery.float()).amax(2)
    orders = [naive_order(full[i], set(exclude[i].tolist())) for i in range(n_q)]
    want_ranks = [orders[i].index(int(targets[i])) for i in range(n_q)]
    assert len(set(want_ranks)) > 3
    got_ranks = M.target_ranks(query, gallery, targets, exclude_rows=exclude, chunk_size=chunk_size,
                               similarity=similarity)
    assert got_ranks.tolist() == want_ranks
    metrics = cp.retrieval_metrics(query, gallery, targets, ks=(1, 3, 10, 50), exclude_rows=exclude,
                                   chunk_size=chunk_size, similarity=similarity)
    for k in (1, 3, 10, 50):
        assert metrics[f"R@{k}"] == pytest.approx(100.0 * sum(r < k for r in want_ranks) / n_q)
    values, rows = M.topk_rows(query, gallery, 50, exclude_rows=exclude, chunk_size=chunk_size, similarity=similarity)
    assert rows.tolist() == [o[:50] for o in orders]
    assert torch.equal(values, torch.gather(full, 1, rows))
    # subsets: 6 random candidates including the target
    subset = torch.cat([targets[:, None], torch.randint(-1, n_g, (n_q, 5), generator=g)], dim=1)
    sub_ranks = M.subset_ranks(query, gallery, targets, subset, exclude_rows=exclude, similarity=similarity)
    for i in range(n_q):
        members = {j for j in subset[i].tolist() if j >= 0}
        order = [j for j in orders[i] if j in members]
        assert sub_ranks[i] == order.index(int(targets[i]))


def test_random_float_embeddings_on_a_dyadic_grid():
    # values k/8 with small D: float32 products and sums are exact, so chunked == full sort exactly
    g = torch.Generator().manual_seed(11)
    query = torch.randint(-8, 9, (31, 6), generator=g).float() / 8
    gallery = torch.randint(-8, 9, (503, 6), generator=g).float() / 8
    targets = torch.randint(0, 503, (31,), generator=g)
    full = query @ gallery.T
    orders = [naive_order(full[i], set()) for i in range(31)]
    assert M.target_ranks(query, gallery, targets, chunk_size=29).tolist() == \
        [orders[i].index(int(targets[i])) for i in range(31)]
    _, rows = M.topk_rows(query, gallery, 10, chunk_size=29)
    assert rows.tolist() == [o[:10] for o in orders]


def test_topk_with_fewer_candidates_than_k():
    query = torch.ones(2, 1)
    gallery = torch.tensor([[3.0], [1.0], [2.0]])
    exclude = torch.tensor([[0, 2], [-1, -1]])
    values, rows = M.topk_rows(query, gallery, 3, exclude_rows=exclude, chunk_size=2)
    assert rows.tolist() == [[1, -1, -1], [0, 2, 1]]
    assert values[0, 0] == 1.0 and torch.isinf(values[0, 1:]).all() and values[1].tolist() == [3.0, 2.0, 1.0]


def _args():
    scores, targets = world_with_ranks([0, 1, 2], 20)
    query, gallery = one_hot_world(scores)
    return dict(query=query, gallery=gallery, target_rows=targets)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(query=a["query"][0]), ShapeError, "2-D"),
    (lambda a: a.update(gallery=a["gallery"][:, None]), ShapeError, "2-D"),
    (lambda a: a.update(gallery=a["gallery"][:, :2]), ShapeError, "dims differ"),
    (lambda a: a.update(target_rows=a["target_rows"][:2]), ShapeError, "(Q,)"),
    (lambda a: a.update(target_rows=a["target_rows"].int()), DTypeError, "int64"),
    (lambda a: a.update(target_rows=a["target_rows"] + 20), ShapeError, "out of range"),
    (lambda a: a.update(query=a["query"].long()), DTypeError, "floating"),
    (lambda a: a["gallery"].__setitem__((4, 0), float("inf")), NonFiniteError, "gallery rows [4]"),
    (lambda a: a.update(gallery=torch.empty(20, 3, device="meta")), DeviceError, "one device"),
    (lambda a: a.update(ks=()), ConfigError, "ks"),
    (lambda a: a.update(ks=(0, 5)), ConfigError, "positive"),
    (lambda a: a.update(similarity="l2"), ConfigError, "similarity"),
    (lambda a: a.update(chunk_size=-3), ConfigError, "chunk_size"),
    (lambda a: a.update(exclude_rows=torch.tensor([[5], [-1], [-4]])), ShapeError, "for query 2"),
    (lambda a: a.update(exclude_rows=torch.tensor([[5, 1]])), ShapeError, "(Q, K)"),
    (lambda a: a.update(subset_rows=torch.tensor([[20], [-1], [-1]])), ShapeError, "subset_rows"),
])
def test_validation_errors(change, error, words):
    args = _args()
    change(args)
    with pytest.raises(error) as info:
        cp.retrieval_metrics(**args)
    assert words in str(info.value) and "Fix:" in str(info.value)


def test_excluded_target_and_target_outside_subset_are_errors():
    args = _args()
    t = args["target_rows"]
    exclude = torch.tensor([[-1], [int(t[1])], [-1]])
    with pytest.raises(ConfigError, match=r"excluded rows.*queries \[1\]"):
        cp.retrieval_metrics(**args, exclude_rows=exclude)
    with pytest.raises(ConfigError, match="excluded rows"):
        M.target_ranks(**args, exclude_rows=exclude)
    subset = torch.stack([t, t, (t + 1) % 20], dim=1)
    subset[2, :2] = -1
    with pytest.raises(ConfigError, match=r"not among its subset rows.*queries \[2\]"):
        cp.retrieval_metrics(**args, subset_rows=subset)


def test_topk_validation():
    args = _args()
    with pytest.raises(ConfigError, match="k must be"):
        M.topk_rows(args["query"], args["gallery"], 21)
    with pytest.raises(ConfigError, match="k must be"):
        M.topk_rows(args["query"], args["gallery"], 0)


# --------------------------------------------------------------------------------------------
# the CUDA-oriented paths, forced on CPU: large chunk budget, bf16 scoring, scatter masking,
# float top-k with the exact-key fallback for ties
# --------------------------------------------------------------------------------------------

def _tie_world(similarity, n_q=19, n_g=263, d=5, t=3, seed=21):
    """Integer embeddings (exact scores, many exact ties), bf16 gallery, random exclusions with repeats."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randint(-2, 3, (n_q, d), generator=g).float()
    shape = (n_g, d) if similarity == "dot" else (n_g, t, d)
    gallery = torch.randint(-2, 3, shape, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, n_g, (n_q,), generator=g)
    exclude = torch.randint(-1, n_g, (n_q, 6), generator=g)
    exclude[:, 5] = exclude[:, 4]  # a repeated exclusion scatters twice into one column
    exclude[exclude == targets[:, None]] = -1
    full = query @ gallery.float().T if similarity == "dot" else \
        torch.einsum("qd,gtd->qgt", query, gallery.float()).amax(2)
    orders = [naive_order(full[i], set(exclude[i].tolist())) for i in range(n_q)]
    return query, gallery, targets, exclude, full, orders


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
@pytest.mark.parametrize("budget", [1 << 40, 4 * 19 * 3 * 37])  # one chunk for everything; odd chunks of 37 rows
@pytest.mark.parametrize("bf16", [False, True])
def test_forced_cuda_paths_match_naive_sort_with_ties(similarity, budget, bf16, monkeypatch):
    monkeypatch.setattr(S, "score_budget", lambda device: budget)
    monkeypatch.setattr(S, "use_bf16_scoring", lambda q, g: bf16 and g.dtype == torch.bfloat16)
    query, gallery, targets, exclude, full, orders = _tie_world(similarity)
    want_ranks = [orders[i].index(int(targets[i])) for i in range(len(orders))]
    assert len(set(want_ranks)) > 3
    got = M.target_ranks(query, gallery, targets, exclude_rows=exclude, similarity=similarity)
    assert got.tolist() == want_ranks
    for k in (1, 7, 50, 257):  # 257: fewer candidates than k for queries with 7 distinct exclusions
        values, rows = M.topk_rows(query, gallery, k, exclude_rows=exclude, similarity=similarity)
        want = [o[:k] + [-1] * (k - len(o[:k])) for o in orders]
        assert rows.tolist() == want
        ok = rows >= 0
        assert torch.equal(values[ok], torch.gather(full, 1, rows.clamp_min(0))[ok])
        assert torch.isinf(values[~ok]).all()


def test_float_topk_fast_path_is_used_and_ties_fall_back_exactly(monkeypatch):
    calls = []
    exact = M._topk_keys_exact
    monkeypatch.setattr(M, "_topk_keys_exact", lambda q, *a: calls.append(q.shape[0]) or exact(q, *a))
    g = torch.Generator().manual_seed(5)
    # continuous random scores: no ties, so the float top-k alone is exact and no query is redone
    query = torch.randn(13, 9, generator=g)
    gallery = torch.randn(301, 9, generator=g)
    _, rows = M.topk_rows(query, gallery, 11, chunk_size=41)
    full = (query.double() @ gallery.double().T)
    assert rows.tolist() == [naive_order(full[i], set())[:11] for i in range(13)]
    assert calls == []
    # exact ties straddling the k-th score: only those queries take the exact path, results unchanged
    query, gallery, _, exclude, full, orders = _tie_world("dot", seed=8)
    _, rows = M.topk_rows(query, gallery, 9, exclude_rows=exclude, chunk_size=53)
    assert rows.tolist() == [o[:9] for o in orders]
    assert calls and sum(calls) <= query.shape[0]


def test_bf16_split_is_exact_and_scores_equal_the_upcast_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 29, generator=g) * torch.logspace(-20, 20, 29)  # normal float32 values of any size
    parts = S.split_bf16(x)  # (37, 87)
    assert parts.dtype == torch.bfloat16 and parts.shape == (37, 87)
    hi, mid, lo = parts.double().split(29, dim=1)
    assert torch.equal(hi + mid + lo, x.double())
    # dyadic values needing more than 8 bits (13) but summing exactly (<= 24 bits): the bf16 path and the float32 upcast
    # give identical scores
    query = (
        torch.randint(-64, 65, (7, 11), generator=g).float() / 64 + torch.randint(-3, 4, (7, 11), generator=g) / 2**12
    )
    gallery = (torch.randint(-8, 9, (23, 4, 11), generator=g).float() / 8).to(torch.bfloat16)
    for sim, gal in (("dot", gallery[:, 0]), ("max_token", gallery)):
        assert torch.equal(S.similarity(query, gal, sim, bf16=True), S.similarity(query, gal, sim, bf16=False))
    # general floats: the same quantity up to float32 summation order
    query = torch.randn(7, 300, generator=g)
    gallery = torch.randn(23, 300, generator=g).to(torch.bfloat16)
    exact = query.double() @ gallery.double().T
    assert torch.allclose(S.similarity(query, gallery, "dot", bf16=True).double(), exact, atol=1e-4)
    bf16_rounded_query = query.bfloat16().double() @ gallery.double().T  # what a plain bf16 cast would score
    assert (S.similarity(query, gallery, "dot", bf16=True).double() - exact).abs().max() < \
        (bf16_rounded_query - exact).abs().max() / 100


def test_scatter_mask_matches_a_loop():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(11, 17, generator=g)
    rows = torch.randint(-1, 60, (11, 5), generator=g)
    rows[:, 4] = rows[:, 3]
    want = scores.clone()
    for i in range(11):
        for r in rows[i].tolist():
            if 30 <= r < 47:
                want[i, r - 30] = float("-inf")
    got = S.mask_rows_(scores.clone(), rows, 30)
    assert torch.equal(got, want)
    keys = torch.randint(-100, 100, (11, 17), generator=g)
    masked = S.mask_rows_(keys.clone(), rows, 30)
    assert torch.equal(masked == torch.iinfo(torch.int64).min, torch.isinf(want))
    assert torch.equal(masked[~torch.isinf(want)], keys[~torch.isinf(want)])


def test_cuda_budget_is_larger_and_bounded(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert S.score_budget(torch.device("cuda", 0)) == S.CUDA_SCORE_BUDGET_MAX
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    assert S.score_budget(torch.device("cuda", 0)) == S.SCORE_BUDGET_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    assert S.score_budget(torch.device("cuda", 0)) == 1 << 28
    assert S.score_budget(torch.device("cpu")) == S.SCORE_BUDGET_BYTES
    # 4k queries over 1M rows: 16 chunks at the cap instead of ~490 at the CPU budget
    assert S.chunk_rows(4096, 1, None, torch.device("cpu")) == 2048
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert -(-1_000_000 // S.chunk_rows(4096, 1, None, torch.device("cuda", 0))) == 16


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
def test_non_finite_rows_are_found_piece_by_piece(similarity, monkeypatch):
    """The finiteness check runs over pieces of rows (no gallery-sized mask): rows in every piece are named."""
    from cir_plugins import checks

    monkeypatch.setattr(checks, "_FINITE_ROWS_STEP", 3)
    g = torch.Generator().manual_seed(4)
    gallery = torch.randn(11, 2, 4, generator=g) if similarity == "max_token" else torch.randn(11, 4, generator=g)
    gallery[1].view(-1)[0] = float("nan")
    gallery[7].view(-1)[-1] = float("-inf")
    gallery[10].view(-1)[2] = float("inf")
    query = torch.randn(5, 4, generator=g)
    with pytest.raises(NonFiniteError, match=r"gallery rows \[1, 7, 10\]"):
        cp.retrieval_metrics(query, gallery, torch.tensor([0, 2, 3, 4, 5]), ks=(1,), similarity=similarity)
    query[4, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"query rows \[4\]"):
        M.topk_rows(query, gallery, 2, similarity=similarity)
    assert checks._non_finite_rows(gallery).tolist() == [i in (1, 7, 10) for i in range(11)]
