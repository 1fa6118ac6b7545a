"""Reliability of the caption cache, second pass (issue 18, items 6 and 12): a captions file changed under the
same name never returns the old captions, processes sharing a cache never cut each other's lines, and an empty
cached caption is captioned again instead of being returned."""

from __future__ import annotations

import json
import threading
import time

from cir_plugins.positives.captioners import (
    CaptionCache,
    PrecomputedCaptioner,
    _CacheLock,
    cache_file_name,
    caption_images,
)

IDS = [f"im{i}" for i in range(5)]


def _write(path, captions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(captions))
    return path


def _run(captioner, cache_dir):
    # as the augmenter does: one cache file per captioner name, in one cache folder
    return caption_images(
        captioner,
        IDS,
        {i: None for i in IDS},
        cache_path=cache_dir / cache_file_name(captioner.name),
        show_progress=False,
    )


def test_a_captions_file_of_the_same_name_in_another_folder_is_not_served_from_the_cache(tmp_path):
    a = _write(tmp_path / "A" / "captions.json", {i: f"a red {i}" for i in IDS})
    b = _write(tmp_path / "B" / "captions.json", {i: f"a blue {i}" for i in IDS})
    cache = tmp_path / "cache"
    first = _run(PrecomputedCaptioner(a), cache)
    assert (first.new, first.cached) == (5, 0)
    second = _run(PrecomputedCaptioner(b), cache)
    assert (second.new, second.cached) == (5, 0)  # was "0 new, 5 cached" with A's captions
    assert second.captions == {i: f"a blue {i}" for i in IDS}
    assert _run(PrecomputedCaptioner(a), cache).cached == 5  # A again: its own cache is still good


def test_editing_the_captions_file_in_place_starts_a_fresh_cache(tmp_path):
    path = _write(tmp_path / "captions.json", {i: f"old {i}" for i in IDS})
    cache = tmp_path / "cache"
    _run(PrecomputedCaptioner(path), cache)
    _write(path, {i: f"new {i}" for i in IDS})
    run = _run(PrecomputedCaptioner(path), cache)
    assert run.cached == 0 and run.captions["im0"] == "new im0"


def test_an_empty_cached_caption_is_captioned_again(tmp_path):
    source = _write(tmp_path / "captions.json", {i: f"a cat {i}" for i in IDS})
    captioner = PrecomputedCaptioner(source)
    cache_path = tmp_path / "cache" / cache_file_name(captioner.name)
    cache_path.parent.mkdir()
    lines = [{"id": i, "caption": f"a cat {i}", "captioner": captioner.name} for i in IDS]
    lines[2]["caption"] = "   "  # written by an older version, or edited
    cache_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cache = CaptionCache(cache_path, captioner.name)
    assert cache.empty_lines == 1 and "im2" not in cache
    run = caption_images(captioner, IDS, {i: None for i in IDS}, cache_path=cache_path, show_progress=False)
    assert (run.cached, run.new, run.empty_lines) == (4, 1, 1) and run.captions["im2"] == "a cat im2"
    assert all(c.strip() for c in run.captions.values())


def test_an_opener_waits_for_a_writer_that_holds_the_lock_instead_of_cutting_its_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"id": "im0", "caption": "first", "captioner": "c"}) + "\n")
    line = json.dumps({"id": "im1", "caption": "written slowly by another process", "captioner": "c"}) + "\n"
    holding = threading.Event()

    def slow_writer():  # a second open file description: flock treats it as another process
        with _CacheLock(path), open(path, "a", encoding="utf-8") as handle:
            handle.write(line[:20])
            handle.flush()
            holding.set()
            time.sleep(0.5)
            handle.write(line[20:])
            handle.flush()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert holding.wait(10)
    assert not path.read_text().endswith("\n")  # the line is half written right now
    cache = CaptionCache(path, "c")  # blocks until the writer lets go
    writer.join()
    assert cache.torn_lines == 0
    assert cache.captions == {"im0": "first", "im1": "written slowly by another process"}
    assert CaptionCache(path, "c").captions == cache.captions  # nothing was cut off the file


def test_a_torn_line_of_a_dead_writer_is_still_cut_off(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"id": "im0", "caption": "first", "captioner": "c"}) + "\n" + '{"id": "im1", "cap')
    cache = CaptionCache(path, "c")
    assert cache.torn_lines == 1 and cache.captions == {"im0": "first"}
    assert path.read_text().endswith("\n")
