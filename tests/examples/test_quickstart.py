"""The quickstart: `--quick` runs end to end and writes the table as JSON (every row, every metric), a PNG and the
retrieval report; `--quick --worlds 2` writes the held-out table with paired confidence intervals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

ROWS = {"untrained (pretrained CLIP, no CIR training)", "baseline", "+N", "+P (paper)", "+P+N (paper)",
        "+P (ours, no rewrite)", "+P+N (ours, no rewrite)", "+P (ours, oracle rewrite)", "+P+N (ours, oracle rewrite)",
        "zero-shot"}
METRICS = {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "Rmean"}


def test_table_helpers_on_hand_made_results(tmp_path):
    import quickstart

    per_seed = {s: {"rows": {r: {m: float(s * 10 + k) for k, m in enumerate(quickstart.METRICS)}
                             for r in ("baseline", "+P")}} for s in (0, 1, 2)}
    table = quickstart.summarise(per_seed)
    assert table["baseline"]["R@1"]["mean"] == pytest.approx(10.0)  # values 0, 10, 20
    assert table["baseline"]["R@1"]["std"] == pytest.approx(10.0)  # sample std of 0, 10, 20
    text = quickstart.format_table(table, 3)
    assert "10.0±10.0" in text and text.splitlines()[0].split()[0] == "row"
    quickstart.bar_chart(table, tmp_path / "chart.png", 3)
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused():
    import quickstart

    with pytest.raises(SystemExit):
        quickstart.main(["--seeds", "0"])
    for worlds in ("0", "0,3", "3,3", "x", "-1"):  # world 0 is the tuning world: never a held-out one
        with pytest.raises(SystemExit):
            quickstart.main(["--worlds", worlds])
    assert quickstart.parse_worlds("3") == [1, 2, 3] and quickstart.parse_worlds("11,23") == [11, 23]


def quickstart_rows() -> tuple:
    import quickstart

    return quickstart.ROWS


def _env():
    # the library from this checkout, whether or not it was pip-installed
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _check_rows(report: dict) -> None:
    assert set(report["rows"]) == ROWS
    for row, metrics in report["rows"].items():
        assert set(metrics) == METRICS, row
        assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in metrics.values()), (row, metrics)
        assert metrics["Rmean"] == pytest.approx((metrics["R@5"] + metrics["Rs@1"]) / 2)
        assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= metrics["R@50"]


def _check_report_files(folder: Path) -> None:
    """The retrieval report: a PNG, a self-contained HTML page (images inlined) and its JSON."""
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and 'src="http' not in page and "[win]" in page
    shown = json.loads((folder / "report.json").read_text())
    assert shown["summary"]["names"] == ["+P+N (ours, no rewrite)", "baseline"] and shown["shown"]
    for entry in shown["shown"]:
        assert len(entry["top"]) == len(entry["compare_top"]) == 5 and entry["outcome"] in ("win", "loss")
        assert (entry["rank"] < entry["compare_rank"]) == (entry["outcome"] == "win")


def test_quick_run_on_two_held_out_worlds_writes_the_paired_table_and_the_picture(tmp_path):
    """`--quick --worlds 2`: every row on worlds 1 and 2, the table of differences to the baseline with bootstrap
    intervals (written after each world), per-world results and the retrieval report."""
    out = tmp_path / "held"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--quick", "--worlds", "2",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    held = json.loads((out / "heldout.json").read_text())
    assert held["runs"] == [{"world": 1, "seed": 0}, {"world": 2, "seed": 0}]
    table = held["table"]
    assert set(table) == ROWS
    for row, entry in table.items():
        per_run = [held["rows"][f"world {w} seed 0"][row]["Rmean"] for w in (1, 2)]
        assert entry["Rmean"] == pytest.approx(sum(per_run) / 2)  # per-query shares average to the table's Rmean
        if row == "baseline":
            continue
        base = [held["rows"][f"world {w} seed 0"]["baseline"]["Rmean"] for w in (1, 2)]
        diffs = [a - b for a, b in zip(per_run, base)]
        assert entry["diff"] == pytest.approx(sum(diffs) / 2)
        assert entry["per_world"] == {"1": pytest.approx(diffs[0]), "2": pytest.approx(diffs[1])}
        assert entry["low"] <= entry["diff"] <= entry["high"] and entry["level"] == 0.95
        assert entry["worlds_above_zero"] == sum(d > 0 for d in diffs) and entry["worlds"] == 2
    markdown = (out / "heldout.md").read_text()
    assert all(f"| {row} |" in markdown for row in ROWS) and "95% CI" in markdown
    assert (out / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for world in (1, 2):
        report = json.loads((out / f"world{world}" / "results.json").read_text())
        assert report["world_seed"] == world
        _check_rows(report)
    _check_report_files(out / "report")
    assert "world 0" not in proc.stdout  # the tuning world is not run


def test_quick_run_writes_every_row_and_metric(tmp_path):
    """The main job end to end on the quick budget (about 25 s from nothing, then ~15 s cached): in the default
    tier, so CI runs the quickstart itself, not only its helpers."""
    out = tmp_path / "qs"
    env = _env()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--quick", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    _check_rows(report)
    run = report["per_seed"]["0"]
    info = run["info"]
    generated = info["generated"]
    assert all(generated[recipe]["triplets"] > 0 for recipe in ("paper", "ours", "oracle"))
    # the release's rule for over-long texts: replaced by the target caption, counted; the paper's 8-word captions
    # make the paper recipe's texts fit far more often than the oracle's whole captions do
    assert generated["paper"]["long_text"] == "target" and generated["paper"]["caption_words"] == 8
    assert generated["oracle"]["caption_words"] is None and generated["oracle"]["rewritten"] > 0
    assert generated["paper"]["over_limit"] / generated["paper"]["templated_texts"] < \
        generated["oracle"]["over_limit"] / generated["oracle"]["templated_texts"]
    assert info["annotated_share"]["paper"] == pytest.approx(28225 / (28225 + 16939))
    assert "over the text tower's" in proc.stdout
    # the world's pixel-identical copies share a bank row: fewer rows (groups) than train images
    assert info["duplicate_groups"] < info["train_images"]
    assert f"bank: {info['duplicate_groups']} rows for {info['train_images']} train images" in proc.stdout
    # per-query ranks reproduce the table's recalls
    for row, ranks in run["per_query"].items():
        hits5 = sum(r < 5 for r in ranks["rank"]) / len(ranks["rank"]) * 100
        hits1 = sum(r < 1 for r in ranks["subset_rank"]) / len(ranks["subset_rank"]) * 100
        assert hits5 == pytest.approx(report["rows"][row]["R@5"]) and hits1 == pytest.approx(
            report["rows"][row]["Rs@1"]
        )
    # every val-selected run left its epochs' val Rmean: the numbers the choices are made on
    assert {"baseline", "plus_p_paper", "plus_n", "plus_pn_paper", "plus_p_ours", "plus_pn_ours", "plus_p_oracle",
            "plus_pn_oracle"} <= set(info["val"])
    # the default budget's levers are on in the quick one too: the oracle rows' rewrite, best epoch chosen on val
    assert report["budget_values"]["select_on_val"]
    assert "rewrite:" in proc.stdout and "best epoch by val Rmean" in proc.stdout
    steps = info["stage2_steps"]
    # equal stage-2 budgets
    assert steps["+P+N (ours, no rewrite)"] == steps["+P+N (ours, oracle rewrite)"] == steps["+P+N (paper)"] \
        == steps["+N"]
    assert list(report["rows"]) == [r for r in quickstart_rows() if r in report["rows"]]  # the table's order
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_report_files(out / "report")
    assert "results.json" in proc.stdout and "results.png" in proc.stdout and "total" in proc.stdout
    # deterministic for a seed: a second run (cached world and CLIP) gives the same table
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--quick", "--out", str(out),
                            "--no-progress"], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]


@pytest.mark.slow
def test_quick_run_with_per_row_stage2_passes(tmp_path):
    """stage2_steps=None: each stage-2 run takes stage2_epochs passes over its own triplets, so +P+N takes more
    steps than +N."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = ("import dataclasses, sys; sys.path.insert(0, 'examples'); import quickstart as q; "
              "q.BUDGETS['quick'] = dataclasses.replace(q.BUDGETS['quick'], stage2_steps=None); "
              f"sys.exit(q.main(['--quick', '--no-progress', '--out', {str(tmp_path / 'qs')!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert report["budget_values"]["stage2_steps"] is None
    steps = report["per_seed"]["0"]["info"]["stage2_steps"]
    assert steps["+P+N (ours, no rewrite)"] > steps["+N"] > 0 and steps["+P+N (paper)"] > steps["+N"]
    assert set(report["rows"]) == ROWS


def test_budget_refuses_stage2_steps_that_do_not_split_into_rounds():
    import quickstart

    for bad in (0, -10, 25, 2.5, True):
        with pytest.raises(ValueError, match="stage2_steps"):
            quickstart.Budget(stage2_steps=bad)
    assert quickstart.Budget(stage2_steps=None).stage2_steps is None
    assert quickstart.Budget().stage2_steps % quickstart.Budget().stage2_epochs == 0
    for bad in ({"long_text": "cut"}, {"paper_long_text": None}, {"report_row": "baseline"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            quickstart.Budget(**bad)


def test_the_paper_mapping_is_the_release_data_choices():
    """The paper rows keep the release's data choices: its annotated share (28,225 annotated CIRR triplets beside
    one generated triplet per train image, 16,939 at most), its window as fractions of N, its 8-word captions, and
    over-long texts replaced by the target caption."""
    import quickstart

    budget = quickstart.BUDGETS["default"]
    assert budget.paper_annotated_fraction == pytest.approx(0.6250, abs=1e-4)
    assert budget.paper_rank_window == pytest.approx((10000 / 16939, 15000 / 16939))
    assert budget.paper_long_text == "target" and budget.caption_words == 8 and budget.paper_templates == "cirr"
    # the rows a user can reproduce on real data come before the oracle rows, the references last
    rows = quickstart.ROWS
    assert rows.index("+P+N (ours, no rewrite)") < rows.index("+P (ours, oracle rewrite)") < rows.index("zero-shot")
    assert rows[:4] == ("baseline", "+N", "+P (paper)", "+P+N (paper)")


def _fake_report(folder: Path, seed: int, budget: dict, world_seed: int = 0) -> None:
    import quickstart

    rows = {r: {m: float(seed + k) for k, m in enumerate(quickstart.METRICS)} for r in ("baseline", "+P+N")}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "budget_values": budget, "world_seed": world_seed, "budget": "default",
        "per_seed": {str(seed): {"rows": rows, "info": {}, "seconds": 1.0}},
        "step_seconds": {"x": 1.0}, "total_seconds": 2.0}))


def test_merge_averages_runs_of_one_configuration(tmp_path):
    import quickstart

    budget = quickstart.BUDGETS["default"].to_dict()
    for seed in (0, 1, 2):
        _fake_report(tmp_path / f"s{seed}", seed, budget)
    assert (
        quickstart.main(["--merge", *(str(tmp_path / f"s{s}") for s in (0, 1, 2)), "--out", str(tmp_path / "m")]) == 0
    )
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["seeds"] == [0, 1, 2]
    assert merged["rows"]["baseline"]["R@1"] == pytest.approx(1.0)  # mean of 0, 1, 2
    assert merged["spread"]["baseline"]["R@1"] == pytest.approx(1.0)  # sample std of 0, 1, 2
    assert (tmp_path / "m" / "results.png").is_file()


def test_merge_refuses_mixed_configurations_and_repeated_seeds(tmp_path):
    import quickstart

    budget = quickstart.BUDGETS["default"].to_dict()
    _fake_report(tmp_path / "a", 0, budget)
    _fake_report(tmp_path / "b", 1, {**budget, "stage2_lr": 1.0})
    _fake_report(tmp_path / "c", 0, budget)
    with pytest.raises(SystemExit, match="differ in budget"):
        quickstart.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="appears twice"):
        quickstart.main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="no results.json"):
        quickstart.main(["--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])


def test_the_thread_count_follows_the_idle_cores_between_steps(monkeypatch):
    """Without --threads the quickstart looks at the idle cores again before every step: a job that starts beside
    it takes it down to one thread, and back up to two when the job ends; with --threads it never changes."""
    import quickstart
    import torch

    before = torch.get_num_threads()
    idle = iter([0.4, 1.9])
    monkeypatch.setattr(quickstart, "idle_cores", lambda seconds=0.5: next(idle))
    try:
        torch.set_num_threads(2)
        clock = quickstart.Clock(adapt_threads=True)
        seen = [clock.run("busy", torch.get_num_threads), clock.run("idle", torch.get_num_threads)]
        assert seen == [1, 2]
        fixed = quickstart.Clock()
        assert fixed.run("fixed", torch.get_num_threads) == 2  # no sample taken: the iterator is spent
    finally:
        torch.set_num_threads(before)
