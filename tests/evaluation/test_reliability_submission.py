"""The two CIRR submission files are written as a pair (issue 18, item 12): each atomically, the manifest with
both hashes removed before the first and written after the second, so an interruption between them is visible
(check_cirr_submission refuses the pair) and re-running the write completes it."""

from __future__ import annotations

import json

import pytest
from test_evaluation import submission_case

import cir_plugins.submission as submission
from cir_plugins.errors import SubmissionError
from cir_plugins.submission import check_cirr_submission, write_cirr_submission


class Killed(BaseException):
    pass


def _write(out, ranking, split, reverse=False):
    recall = [list(reversed(r)) if reverse else list(r) for r in ranking.recall_names]
    subset = [list(reversed(s)) if reverse else list(s) for s in ranking.subset_names]
    return write_cirr_submission(out, ranking.pair_ids, recall, subset, split=split)


def test_a_complete_pair_carries_a_manifest_that_checks(tmp_path):
    split, ranking = submission_case()
    path_r, path_s = _write(tmp_path, ranking, split)
    assert check_cirr_submission(tmp_path) == (path_r, path_s)
    manifest = json.loads((tmp_path / "submission_cirr.manifest.json").read_text())
    assert sorted(manifest["files"]) == [path_r.name, path_s.name] and manifest["pairs"] == len(ranking.pair_ids)
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_an_interruption_between_the_two_files_is_visible_and_a_rerun_completes_the_pair(tmp_path, monkeypatch,
                                                                                       kill_at):
    split, ranking = submission_case()
    old_r, old_s = (p.read_bytes() for p in _write(tmp_path, ranking, split))  # an earlier, complete submission
    calls = {"n": 0}
    real_bytes, real_json = submission.atomic_write_bytes, submission.atomic_write_json

    def counting(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:  # killed before this write: recall file, subset file, manifest
                raise Killed()
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(submission, "atomic_write_bytes", counting(real_bytes))
    monkeypatch.setattr(submission, "atomic_write_json", counting(real_json))
    with pytest.raises(Killed):
        _write(tmp_path, ranking, split, reverse=True)
    path_r = tmp_path / "recall_submission_cirr.json"
    path_s = tmp_path / "recall_subset_submission_cirr.json"
    if kill_at == 2:  # the attack: a new recall file beside the old subset file
        assert path_r.read_bytes() != old_r and path_s.read_bytes() == old_s
    with pytest.raises(SubmissionError, match="not a complete pair: its manifest is missing"):
        check_cirr_submission(tmp_path)
    monkeypatch.undo()
    new_r, new_s = _write(tmp_path, ranking, split, reverse=True)
    assert check_cirr_submission(tmp_path) == (new_r, new_s)
    assert new_r.read_bytes() != old_r and new_s.read_bytes() != old_s


def test_a_file_changed_after_the_write_is_named(tmp_path):
    split, ranking = submission_case()
    _, path_s = _write(tmp_path, ranking, split)
    path_s.write_text(path_s.read_text().replace("recall_subset", "recall_subset "))
    with pytest.raises(SubmissionError, match="recall_subset_submission_cirr.json is missing or differs"):
        check_cirr_submission(tmp_path)
    (tmp_path / "submission_cirr.manifest.json").write_text("{")
    with pytest.raises(SubmissionError, match="manifest.json is unreadable"):
        check_cirr_submission(tmp_path)
