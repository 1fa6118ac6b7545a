"""topk_rows' per-chunk candidate filter (issue 20: top-50 over 1M rows): group maxima, the k best
groups, one top-k over their scores. Equal to the plain full sort with the tie rule (score desc, row
asc), with exclusions, many exact ties and chunks that are not a whole number of groups."""

import pytest
import torch
from test_metrics import _tie_world, naive_order

from cir_plugins import metrics as M


@pytest.mark.parametrize("similarity", ["dot", "max_token"])
@pytest.mark.parametrize("group", [2, 5, 16])
@pytest.mark.parametrize("chunk_size", [53, 211, None])
def test_filtered_topk_equals_full_sort_with_ties(similarity, group, chunk_size, monkeypatch):
    monkeypatch.setattr(M, "TOPK_GROUP", group)
    used = []
    real = M._chunk_topk
    monkeypatch.setattr(M, "_chunk_topk", lambda s, kc: used.append(s.shape[1] // group >= 2 * kc) or real(s, kc))
    query, gallery, _, exclude, full, orders = _tie_world(similarity)
    for k in (1, 3, 7):
        values, rows = M.topk_rows(query, gallery, k, exclude_rows=exclude, similarity=similarity,
                                   chunk_size=chunk_size)
        assert rows.tolist() == [o[:k] for o in orders]
        assert torch.equal(values, torch.gather(full, 1, rows))
    assert any(used)  # the filter ran on at least one chunk (at k=1 in every setting here)


def test_filtered_topk_on_continuous_scores_needs_no_exact_redo(monkeypatch):
    monkeypatch.setattr(M, "TOPK_GROUP", 8)
    calls = []
    exact = M._topk_keys_exact
    monkeypatch.setattr(M, "_topk_keys_exact", lambda q, *a: calls.append(q.shape[0]) or exact(q, *a))
    g = torch.Generator().manual_seed(9)
    query, gallery = torch.randn(17, 12, generator=g), torch.randn(2003, 12, generator=g)
    exclude = torch.randint(-1, 2003, (17, 3), generator=g)
    values, rows = M.topk_rows(query, gallery, 10, exclude_rows=exclude, chunk_size=500)
    full = query.double() @ gallery.double().T
    assert rows.tolist() == [naive_order(full[i], set(exclude[i].tolist()))[:10] for i in range(17)]
    assert calls == []
    # the same call with the filter off returns the same scores and rows
    monkeypatch.setattr(M, "TOPK_GROUP", 0)
    values0, rows0 = M.topk_rows(query, gallery, 10, exclude_rows=exclude, chunk_size=500)
    assert torch.equal(rows, rows0) and torch.equal(values, values0)


def test_a_tie_hidden_in_an_unselected_group_is_redone_exactly(monkeypatch):
    # score 1.0 at rows 3 and 40 (groups 0 and 5 of 8 rows); k=1 keeps one group: row 3 must win
    monkeypatch.setattr(M, "TOPK_GROUP", 8)
    scores = torch.zeros(1, 64)
    scores[0, 3] = scores[0, 40] = 1.0
    query, gallery = torch.eye(1), scores.T.contiguous()
    for _ in range(5):
        _, rows = M.topk_rows(query, gallery, 1)
        assert rows.tolist() == [[3]]
    values, cols, lost = M._chunk_topk(scores, 1)
    assert float(lost[0]) == 1.0  # reported, so topk_rows redoes this query with the exact keys
