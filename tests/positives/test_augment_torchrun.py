"""Generation across ranks (issue 29, item 3): ``TripletAugmenter.augment(shard=(rank, world))`` and
``cir-plugins augment`` under torchrun share out embedding, pairing and captioning; rank 0 merges the per-rank
caption caches and writes exactly what one process writes; a run killed on a rank resumes from the caches
without captioning again what was cached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _gloo import spawn_gloo
from test_positives_augmenter import ColourCaptioner, encoder, make_store
from test_positives_command import ENCODER
from torch.multiprocessing.spawn import ProcessException

from cir_plugins.cli import main
from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import ConfigError
from cir_plugins.positives.augmenter import AugmentConfig, RankShare, TripletAugmenter
from cir_plugins.positives.captioners import CaptionCache, merge_rank_caches, rank_cache_path

# --- the caption cache's rank files -------------------------------------------------------------------------------

def test_rank_cache_files_merge_into_the_cache_once(tmp_path):
    main_path = tmp_path / "captions-cap-0123abcd.jsonl"
    assert rank_cache_path(main_path, 1, 2) == tmp_path / "captions-cap-0123abcd.rank1-of-2.jsonl"
    for bad in ((2, 2), (-1, 2), (0, 0), (True, 2)):
        with pytest.raises(ConfigError):
            rank_cache_path(main_path, *bad)
    assert merge_rank_caches(main_path, "cap") is None and not main_path.exists()  # nothing to merge
    CaptionCache(main_path, "cap").append([("a", "cached a")])
    CaptionCache(rank_cache_path(main_path, 0, 2), "cap").append([("a", "other a"), ("b", "b0")])
    CaptionCache(rank_cache_path(main_path, 1, 2), "cap").append([("c", "c1")])
    CaptionCache(rank_cache_path(main_path, 2, 3), "cap").append([("b", "b from 3 ranks"), ("d", "d2")])
    with open(rank_cache_path(main_path, 1, 2), "a") as handle:  # a rank killed mid-write
        handle.write('{"id": "e", "capt')
    CaptionCache(tmp_path / "captions-other-99999999.rank0-of-2.jsonl", "other").append([("z", "z")])
    merged = merge_rank_caches(main_path, "cap")
    assert merged.captions == {"a": "cached a", "b": "b0", "c": "c1", "d": "d2"} and merged.torn_lines == 1
    assert CaptionCache(main_path, "cap").captions == merged.captions  # what a later run reads
    assert [json.loads(line)["id"] for line in main_path.read_text().splitlines()] == ["a", "b", "c", "d"]
    assert sorted(p.name for p in tmp_path.iterdir() if ".rank" in p.name) == [
        "captions-other-99999999.rank0-of-2.jsonl", "captions-other-99999999.rank0-of-2.jsonl.lock"]
    assert merge_rank_caches(main_path, "cap") is None  # merged once: nothing left, nothing appended again
    assert len(main_path.read_text().splitlines()) == 4


def test_rank_shares_are_whole_blocks_in_order():
    draw = np.random.default_rng(0)
    for _ in range(300):
        n, align, world = int(draw.integers(0, 200)), int(draw.integers(1, 40)), int(draw.integers(1, 9))
        spans = [RankShare(rank, world).span(n, align) for rank in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(stop == start for (_, stop), (start, _) in zip(spans, spans[1:]))  # contiguous, in rank order
        assert all(x % align == 0 or x == n for span in spans for x in span)  # block boundaries (or the end)
        sizes = [-(-stop // align) - start // align for start, stop in spans]  # blocks per rank: balanced
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="process group"):
        RankShare.of((0, 2))  # no process group in this process
    with pytest.raises(ConfigError):
        RankShare.of((2, 2))
    assert RankShare.of(None) == RankShare.of((0, 1)) == RankShare(0, 1)


# --- the library on 2 gloo ranks ----------------------------------------------------------------------------------

def _store():
    return make_store(61, seed=5, duplicates=(("d1", "im3"), ("d2", "im3"), ("d3", "im40")))


# small batches and chunks so that every rank embeds and pairs several uneven shares
VARIANTS = {
    "plain": dict(config=dict(rank_window=(1, 12), partners_per_image=2, seed=3, batch_size=7, chunk_size=5,
                              caption_batch_size=4)),
    "groups_refer_subsample": dict(config=dict(rank_window=(0.0, 0.4), partners_per_image=3, seed=1, batch_size=4,
                                               chunk_size=3, refer_only=True, max_triplets=25,
                                               near_duplicate_threshold=0.995, templates="all"),
                                   groups=True),
}


def _augment(variant, cache_dir, shard=None):
    store = _store()
    ids = list(store)
    spec = VARIANTS[variant]
    captioner = ColourCaptioner()
    augmenter = TripletAugmenter(captioner, encoder, config=AugmentConfig(**spec["config"]), cache_dir=cache_dir,
                                 show_progress=False)
    annotated = [Triplet(reference=i, texts=("an edit",), target=ids[0]) for i in ids[::3]]
    groups = {i: "ab"[k % 2] for k, i in enumerate(ids)} if spec.get("groups") else None
    result = augmenter.augment(ids, store, annotated, groups=groups, shard=shard)
    return result, captioner.captioned


def _record(result):
    summary = {k: v for k, v in result.summary.items() if k not in ("seconds", "ranks")}
    triplets = [{"reference": t.reference, "texts": list(t.texts), "target": t.target, "source": t.source,
                 "meta": dict(t.meta)} for t in result.triplets]
    return {"triplets": triplets, "groups": result.groups, "summary": summary}


def _library_ranks(rank, world, folder):
    with pytest.raises(ConfigError, match="cache folder"):  # raised on every rank before any collective
        TripletAugmenter(ColourCaptioner(), encoder, show_progress=False).augment(list(_store()), _store(),
                                                                             shard=(rank, world))
    for variant in VARIANTS:
        result, captioned = _augment(variant, f"{folder}/{variant}", shard=(rank, world))
        assert (result is None) == (rank != 0)
        if rank == 0:
            Path(f"{folder}/{variant}.json").write_text(json.dumps(_record(result)))
        Path(f"{folder}/{variant}.rank{rank}.captioned.json").write_text(json.dumps(captioned))


def test_augment_on_two_ranks_equals_one_process(tmp_path):
    (tmp_path / "ranks").mkdir()
    spawn_gloo(_library_ranks, tmp_path / "ranks", world=2)
    for variant in VARIANTS:
        single, captioned = _augment(variant, tmp_path / "single" / variant)
        assert single.triplets and single.summary["ranks"] == 1
        assert json.loads((tmp_path / "ranks" / f"{variant}.json").read_text()) == json.loads(json.dumps(
            _record(single)))
        shares = [json.loads((tmp_path / "ranks" / f"{variant}.rank{r}.captioned.json").read_text()) for r in (0, 1)]
        assert all(shares) and sorted(shares[0] + shares[1]) == sorted(captioned)  # each image captioned once
        # the merged cache is the one-process cache, line for line; no rank file is left
        ranks_cache, single_cache = (sorted((tmp_path / where / variant).glob("*.jsonl")) for where in
                                     ("ranks", "single"))
        assert [p.name for p in ranks_cache] == [p.name for p in single_cache] and len(single_cache) == 1
        assert ranks_cache[0].read_bytes() == single_cache[0].read_bytes()


# --- cir-plugins augment on 2 gloo ranks, killed and resumed --------------------------------------------------------

class _Watched:
    """The run's captioner, recording the ids it captions (one line each, ``log``); with ``kill_after`` the
    process kills itself (SIGKILL) when asked for more after that many images."""

    def __init__(self, inner, log, kill_after=None):
        self.inner, self.name, self.log, self.kill_after, self.count = inner, inner.name, log, kill_after, 0

    def __call__(self, ids, images):
        if self.kill_after is not None and self.count >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        captions = self.inner(ids, images)
        with open(self.log, "a") as handle:
            handle.write("".join(i + "\n" for i in ids))
        self.count += len(ids)
        return captions


def _cli_rank(rank, world, folder):
    job = json.loads(Path(folder, "job.json").read_text())
    from cir_plugins.cli import augment as command

    build = command.build_captioner
    kill_after = job["kill_after"] if rank == job.get("kill_rank") else None
    command.build_captioner = lambda spec, args: _Watched(build(spec, args), f"{folder}/captioned.rank{rank}",
                                                          kill_after)
    assert main(job["argv"]) == 0


def _run_ranks(folder: Path, argv, kill_rank=None, kill_after=None):
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"argv": argv, "kill_rank": kill_rank, "kill_after": kill_after}))
    spawn_gloo(_cli_rank, folder, world=2)


def _captioned(folder: Path):
    return [line for path in sorted(folder.glob("captioned.rank*")) for line in path.read_text().splitlines()]


def _cached(cache: Path):
    """The ids in the cache and its rank files, read without touching them (a torn last line is no caption)."""
    return {json.loads(line)["id"] for path in cache.glob("*.jsonl") for line in path.read_bytes().split(b"\n")[:-1]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic world (309 training images: two pairing chunks of 256, five embedding batches of 64),
    the toy pair encoder, and one process's output."""
    from cir_plugins.data.synthetic import make_world

    base = tmp_path_factory.mktemp("augment_ranks")
    root = make_world(base / "world", size=dict(n_train_triplets=30, n_train_unlabelled=120, n_val_queries=1,
                                                n_val_distractors=0, n_test_queries=1, n_test_distractors=0),
                      image_size=16, seed=0)
    (base / "enc.py").write_text(ENCODER)
    args = ["augment", "--dataset", "synthetic", "--root", str(root), "--captioner", "synthetic:0.1",
            "--pair-encoder", f"{base / 'enc.py'}:build", "--rank-window", "0.1,0.3", "--partners", "2",
            "--image-size", "16", "--no-progress"]
    assert main(args + ["--out", str(base / "single" / "gen.json")]) == 0
    single = base / "single" / "gen.json"
    needed = _cached(base / "single" / "gen.json.cache")
    assert json.loads((base / "single" / "gen.json.summary.json").read_text())["captions"]["needed"] == len(needed)
    return {"args": args, "single": single, "needed": needed}


def test_augment_command_on_two_ranks_writes_what_one_process_writes(synthetic, tmp_path):
    out = tmp_path / "out" / "gen.json"
    _run_ranks(tmp_path / "ranks", synthetic["args"] + ["--out", str(out)])
    assert out.read_bytes() == synthetic["single"].read_bytes()
    summary = json.loads(out.with_name("gen.json.summary.json").read_text())
    assert summary["ranks"] == 2 and summary["captions"]["new"] == len(synthetic["needed"])
    captioned = [(r, line) for r in (0, 1) for line in (tmp_path / "ranks" / f"captioned.rank{r}").read_text().split()]
    assert sorted(i for _, i in captioned) == sorted(synthetic["needed"])  # each image once, on one rank
    assert {r for r, _ in captioned} == {0, 1}
    cache = out.with_name("gen.json.cache")
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in synthetic["single"].with_name(
        "gen.json.cache").iterdir())  # one cache file (and its lock), no rank file left
    # a later single-process run reuses the merged cache
    assert main(synthetic["args"] + ["--out", str(out)]) == 0
    assert json.loads(out.with_name("gen.json.summary.json").read_text())["captions"]["new"] == 0
    assert out.read_bytes() == synthetic["single"].read_bytes()


@pytest.mark.parametrize("rerun_ranks", [2, 1])
def test_augment_command_killed_on_a_rank_resumes_from_its_cache(synthetic, tmp_path, rerun_ranks):
    out = tmp_path / "out" / "gen.json"
    argv = synthetic["args"] + ["--out", str(out)]
    with pytest.raises(ProcessException):
        _run_ranks(tmp_path / "killed", argv, kill_rank=1, kill_after=16)  # rank 1 dies after two batches of 8
    cache = out.with_name("gen.json.cache")
    assert not out.exists() and any(".rank1-of-2.jsonl" in p.name for p in cache.iterdir())
    before = _cached(cache)  # what the killed run cached: the cache and the rank files
    killed_rank = (tmp_path / "killed" / "captioned.rank1").read_text().split()
    assert len(killed_rank) == 16 and set(killed_rank) <= before < synthetic["needed"]
    if rerun_ranks == 2:
        _run_ranks(tmp_path / "rerun", argv)
        again = _captioned(tmp_path / "rerun")
    else:
        from cir_plugins.cli import augment as command

        build, again = command.build_captioner, []
        log = tmp_path / "rerun.log"
        command.build_captioner = lambda spec, args: _Watched(build(spec, args), log)
        try:
            assert main(argv) == 0
        finally:
            command.build_captioner = build
        again = log.read_text().split()
    # nothing cached is captioned again: the rerun captions exactly what the killed run had not cached
    assert sorted(again) == sorted(synthetic["needed"] - before)
    assert out.read_bytes() == synthetic["single"].read_bytes()
    summary = json.loads(out.with_name("gen.json.summary.json").read_text())
    assert summary["captions"]["cached"] == len(before) and summary["captions"]["new"] == len(again)
    assert not [p for p in cache.iterdir() if ".rank" in p.name]


# --- the real launcher ----------------------------------------------------------------------------------------------

def test_augment_under_torchrun_writes_what_one_process_writes(synthetic, tmp_path):
    out = tmp_path / "gen.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cir_plugins.cli", *synthetic["args"], "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == synthetic["single"].read_bytes()
    assert "ranks 2" in done.stdout and done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
