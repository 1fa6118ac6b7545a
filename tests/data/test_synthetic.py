"""The synthetic CIR world: layout, determinism, caching, edits and groups, captioner."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cir_plugins as cp
from cir_plugins.cli import run_command
from cir_plugins.data import synthetic as syn
from cir_plugins.errors import ConfigError

TINY = dict(n_train_triplets=12, n_train_unlabelled=20, n_val_queries=6, n_val_distractors=8,
            n_test_queries=6, n_test_distractors=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return syn.make_world(tmp_path_factory.mktemp("world") / "w", seed=3, size=TINY, image_size=36)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_world_loads_as_cirr_with_targets_everywhere(world):
    for split, n_q, n_extra in [("train", 12, 20), ("val", 6, 8), ("test", 6, 10)]:
        loaded = cp.load_cirr(world, split, transform="none")
        assert loaded.dataset == "synthetic" and loaded.protocol == "cirr"
        copies = round(0.03 * (6 * n_q + n_extra))  # the default duplicate_rate
        assert len(loaded.triplets) == n_q and len(loaded.gallery_ids) == 6 * n_q + n_extra + copies
        assert all(t.target is not None and len(t.members) == 6 for t in loaded.triplets)
        assert all(t.reference in t.members and t.target in t.members for t in loaded.triplets)
        image = loaded.images[loaded.gallery_ids[0]]
        assert image.shape == (3, 36, 36)
    assert syn.load_scenes(world).keys() >= set(cp.load_cirr(world, "test").gallery_ids)


def test_unlabelled_train_images_and_disjoint_scenes(world):
    train = cp.load_cirr(world, "train")
    in_triplets = {m for t in train.triplets for m in t.members}
    copies = json.loads((world / "synthetic" / "world.json").read_text())["stats"]["duplicates"]
    unlabelled = [i for i in train.gallery_ids if i not in in_triplets and i not in copies]
    assert len(unlabelled) == 20
    scenes = syn.load_scenes(world)
    signatures = [syn._signature(s["objects"]) for name, s in scenes.items() if name not in copies]
    assert len(signatures) == len(set(signatures))  # no scene drawn twice: only the copies repeat one
    split_of = {}
    for split in ("train", "val", "test"):
        for image_id in cp.load_cirr(world, split).gallery_ids:
            assert image_id not in split_of
            split_of[image_id] = split


def edit_distance_is_one(a, b):
    """True if scene b is exactly one edit (recolour/reshape/resize/move/add/remove) from scene a."""
    key = lambda o: (o["shape"], o["color"], o["size"], o["row"], o["col"])  # noqa: E731
    sa, sb = {key(o) for o in a}, {key(o) for o in b}
    only_a, only_b = sa - sb, sb - sa
    if len(a) == len(b) + 1:
        return len(only_a) == 1 and not only_b  # remove
    if len(b) == len(a) + 1:
        return len(only_b) == 1 and not only_a  # add
    if len(a) != len(b) or len(only_a) != 1 or len(only_b) != 1:
        return False
    (x,), (y,) = only_a, only_b
    changed = sum(p != q for p, q in zip(x[:3], y[:3]))
    moved = x[3:] != y[3:]
    return (changed == 1 and not moved) or (changed == 0 and moved)


def test_targets_and_near_variants_follow_the_edits(world):
    scenes = syn.load_scenes(world)
    for split in ("train", "val", "test"):
        for t in cp.load_cirr(world, split).triplets:
            ref, target = scenes[t.reference]["objects"], scenes[t.target]["objects"]
            variants = [m for m in t.members if m not in (t.reference, t.target)]
            assert len(variants) == 4
            near_ref = sum(edit_distance_is_one(ref, scenes[v]["objects"]) for v in variants)
            near_target = sum(edit_distance_is_one(target, scenes[v]["objects"]) for v in variants)
            assert near_ref >= 2 and near_target >= 2
            assert all(edit_distance_is_one(ref, scenes[v]["objects"]) or
                       edit_distance_is_one(target, scenes[v]["objects"]) for v in variants)
            one = edit_distance_is_one(ref, target)
            assert one or t.meta["caption"].count(" ") >= 3  # two edits: a longer, joined caption
            assert t.meta["target_soft"] == {t.target: 1.0}
            assert scenes[t.reference]["caption"] == syn.describe_scene(ref)


def test_captions_are_varied_human_style_not_templates(world):
    scenes = syn.load_scenes(world)
    triplets = [t for s in ("train", "val", "test") for t in cp.load_cirr(world, s).triplets]
    captions = [t.texts[0] for t in triplets]
    assert len(set(captions)) >= 0.9 * len(captions)
    for t in triplets:  # CIRR-style: the change, never the augmenter's full target description
        lowered = t.texts[0].lower()
        assert scenes[t.target]["caption"] not in lowered and scenes[t.reference]["caption"] not in lowered
        assert not lowered.startswith("unlike")
    first_words = {c.split()[0].lower() for c in captions}
    assert len(first_words) >= 5  # many different openings (make, change, remove, add, move, ...)


def test_rendered_pixels_match_the_scene(world):
    scenes = syn.load_scenes(world)
    paths = json.loads((world / "cirr/image_splits/split.rc2.val.json").read_text())
    checked = 0
    for image_id, rel in paths.items():
        array = np.asarray(Image.open(world / rel), dtype=np.float64)
        assert array.shape == (36, 36, 3)
        for obj in scenes[image_id]["objects"]:
            if obj["size"] != "large" or obj["shape"] in ("triangle", "star"):
                continue
            cy, cx = int((obj["row"] + 0.5) * 12), int((obj["col"] + 0.5) * 12)
            patch = array[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(syn.COLOR_RGB[obj["color"]])).max() < 45, (image_id, obj)
            checked += 1
    assert checked > 5


def test_deterministic_cached_and_regenerated(tmp_path):
    a = syn.make_world(tmp_path / "a", seed=1, size=TINY)
    b = syn.make_world(tmp_path / "b", seed=1, size=TINY)
    assert _digest(a) == _digest(b)
    marker = a / "synthetic/world.json"
    stamp = marker.stat().st_mtime_ns
    syn.make_world(a, seed=1, size=TINY)  # same parameters: reused, nothing rewritten
    assert marker.stat().st_mtime_ns == stamp
    syn.make_world(a, seed=2, size=TINY)  # other parameters: regenerated
    assert json.loads(marker.read_text())["params"]["seed"] == 2 and _digest(a) != _digest(b)
    # a killed generation (GENERATING left behind) is never taken for a complete world
    syn.make_world(b, seed=1, size=TINY)
    (b / "synthetic/GENERATING").write_text("{}")
    stamp_b = (b / "synthetic/world.json").stat().st_mtime_ns
    syn.make_world(b, seed=1, size=TINY)
    assert not (b / "synthetic/GENERATING").exists()
    assert (b / "synthetic/world.json").stat().st_mtime_ns != stamp_b
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="overwrite=True"):
        syn.make_world(foreign, size=TINY)
    assert (foreign / "mine.txt").read_text() == "keep me"


def test_config_validation():
    with pytest.raises(ConfigError):
        syn.make_world("/tmp/never", size="huge")
    with pytest.raises(ConfigError):
        syn.WorldConfig(min_objects=2, max_objects=2)
    with pytest.raises(ConfigError):
        syn.WorldConfig.from_dict({"n_train": 3})
    assert syn.WorldConfig.from_dict(syn.WorldConfig().to_dict()) == syn.WorldConfig()


def test_vocabularies_and_describe_scene():
    assert len(syn.SHAPES) >= 4 and len(syn.COLORS) >= 6 and syn.SIZES == ("small", "large")
    assert len(syn.POSITIONS) == 9 and syn.POSITIONS[4] == "centre" and syn.POSITIONS[0] == "top left"
    objects = [{"shape": "square", "color": "blue", "size": "small", "row": 1, "col": 1},
               {"shape": "circle", "color": "red", "size": "large", "row": 0, "col": 0}]
    assert syn.describe_scene(objects) == "a large red circle at the top left and a small blue square in the centre"
    partial = [{"shape": None, "color": "green", "size": None, "row": None, "col": None}]
    assert syn.describe_scene(partial) == "a green shape"


def test_captioner_exact_and_noisy(world):
    scenes = syn.load_scenes(world)
    ids = sorted(scenes)[:40]
    exact = syn.SyntheticCaptioner(world)
    assert exact(ids, [None] * len(ids)) == [scenes[i]["caption"] for i in ids]
    assert isinstance(exact.name, str) and "noise=0" in exact.name
    noisy = syn.SyntheticCaptioner(world, noise=0.5, seed=7)
    first = noisy(ids, [None] * len(ids))
    assert first == syn.SyntheticCaptioner(world, noise=0.5, seed=7)(ids[::-1], [None] * len(ids))[::-1]
    assert sum(a != b for a, b in zip(first, exact(ids))) > len(ids) // 2
    assert first != syn.SyntheticCaptioner(world, noise=0.5, seed=8)(ids)
    assert noisy.name != exact.name
    with pytest.raises(ConfigError):
        syn.SyntheticCaptioner(world, noise=1.5)


def test_docstring_documents_the_statistics():
    doc = syn.__doc__
    assert "cir-plugins world --root DIR" in doc
    d = syn.WorldConfig()
    numbers = re.search(r"train (\d+) annotated triplets \((\d+) group images\) plus (\d+)\s+unlabelled images "
                        r"\((\d+) train images\); val (\d+) queries \+ (\d+) distractors \((\d+) images\);\s+"
                        r"test (\d+) queries \+ (\d+) distractors \((\d+) images\)", doc)
    assert numbers, "the Counts paragraph must state the default counts"
    got = [int(x) for x in numbers.groups()]
    assert got == [d.n_train_triplets, 6 * d.n_train_triplets, d.n_train_unlabelled,
                   6 * d.n_train_triplets + d.n_train_unlabelled, d.n_val_queries, d.n_val_distractors,
                   6 * d.n_val_queries + d.n_val_distractors, d.n_test_queries, d.n_test_distractors,
                   6 * d.n_test_queries + d.n_test_distractors]
    assert (
        f"({len(syn.SHAPES)}: {', '.join(syn.SHAPES)})" in doc
        and f"({len(syn.COLORS)}: {', '.join(syn.COLORS)})" in doc
    )
    for edit in syn.EDIT_TYPES:
        assert edit in doc


@pytest.mark.slow
def test_command_line_quick_world(tmp_path):
    assert run_command("world", ["--root", str(tmp_path / "q"), "--quick", "--seed", "4"]) == 0
    stats = json.loads((tmp_path / "q/synthetic/world.json").read_text())["stats"]
    assert stats["queries"] == {"train": 120, "val": 40, "test": 40}


def test_command_line_config_overrides(tmp_path, capsys):
    tiny = json.dumps({**TINY, "pixel_noise": 3.0})
    assert run_command("world", ["--root", str(tmp_path / "t"), "--config", tiny]) == 0
    params = json.loads((tmp_path / "t/synthetic/world.json").read_text())["params"]
    assert params["pixel_noise"] == 3.0 and params["n_val_queries"] == TINY["n_val_queries"]
    # a bad value is one line and exit code 2
    assert run_command("world", ["--root", str(tmp_path / "u"), "--config", "[1]"]) == 2
    assert "--config must be a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def _obj(shape, color, size, row, col):
    return {"shape": shape, "color": color, "size": size, "row": row, "col": col}


def test_parse_caption_inverts_describe_scene_on_random_scenes():
    import random

    rng = random.Random(0)
    for _ in range(300):
        cells = rng.sample(range(9), rng.randint(1, 3))
        scene = [_obj(rng.choice(syn.SHAPES), rng.choice(syn.COLORS), rng.choice(syn.SIZES), c // 3, c % 3)
                 for c in cells]
        for obj in scene:  # noisy captioners drop attributes: the parser must return None for them
            for key in ("shape", "color", "size"):
                if rng.random() < 0.1:
                    obj[key] = None
        parsed = syn.parse_caption(syn.describe_scene(scene))
        assert sorted(parsed, key=lambda o: (o["row"], o["col"])) == sorted(scene, key=lambda o: (o["row"], o["col"]))
    assert syn.parse_caption("an empty grey picture") == []
    assert syn.parse_caption("a red circle at the top left") == [_obj("circle", "red", None, 0, 0)]
    assert syn.parse_caption("two dogs on a beach") is None
    assert syn.parse_caption("a red circle at the top left and a dog") is None


def test_rewriter_turns_a_template_into_the_edits_between_the_captions():
    reference = [_obj("circle", "red", "large", 0, 0), _obj("star", "blue", "small", 1, 1)]
    target = [_obj("circle", "green", "large", 0, 0), _obj("star", "blue", "small", 2, 2)]
    r, t = syn.describe_scene(reference), syn.describe_scene(target)
    rewriter = syn.SyntheticRewriter(max_edits=2)
    expected = "make the circle green and move the star to the bottom right"
    assert rewriter(f"{t} instead of {r}") == expected
    assert rewriter(f"Unlike {r}, I want {t}") == expected
    assert rewriter.rewritten == 2 and rewriter.kept == 0

    cases = [  # (reference, target, phrase)
        (
            [_obj("circle", "red", "large", 0, 0)],
            [_obj("square", "red", "large", 0, 0)],
            "turn the circle into a square",
        ),
        (
            [_obj("circle", "red", "large", 0, 0)],
            [_obj("square", "blue", "large", 0, 0)],
            "replace the circle with a blue square",
        ),
        (
            [_obj("circle", "red", "large", 0, 0)],
            [_obj("star", "orange", "large", 0, 0)],
            "replace the circle with an orange star",
        ),
        (
            [_obj("star", "red", "large", 0, 0)],
            [_obj("cross", "red", "large", 0, 0), _obj(None, "orange", None, 1, 1)],
            "turn the star into a cross and add an orange shape in the centre",
        ),  # a noisy caption's missing attributes stay out of the phrase
        ([_obj("circle", "red", "small", 0, 0)], [_obj("circle", "red", "large", 0, 0)], "make the circle bigger"),
        (
            [_obj("circle", "red", "small", 0, 0), _obj("star", "red", "small", 0, 1)],
            [_obj("star", "red", "small", 0, 1)],
            "remove the circle",
        ),
        (
            [_obj("star", "red", "small", 0, 1)],
            [_obj("star", "red", "small", 0, 1), _obj("cross", "cyan", "large", 2, 0)],
            "add a large cyan cross at the bottom left",
        ),
        # two circles: the name needs the colour
        (
            [_obj("circle", "red", "small", 0, 0), _obj("circle", "blue", "small", 0, 2)],
            [_obj("circle", "red", "small", 0, 0), _obj("circle", "blue", "large", 0, 2)],
            "make the blue circle bigger",
        ),
    ]
    for before, after, phrase in cases:
        assert rewriter(f"{syn.describe_scene(after)} instead of {syn.describe_scene(before)}") == phrase


def test_rewriter_keeps_what_it_cannot_rewrite():
    rewriter = syn.SyntheticRewriter(max_edits=1)
    one = syn.describe_scene([_obj("circle", "red", "large", 0, 0)])
    three_edits = syn.describe_scene([_obj("square", "blue", "small", 1, 1)])
    kept = [
        one,  # the "{target}" template: no reference to compare with
        f"{one} instead of {one}",  # the same scene: nothing to say
        f"{three_edits} instead of {one}",  # remove + add is 2 edits > max_edits=1
        f"a red circle instead of {one}",  # no position stated: cannot match objects
        f"two dogs instead of {one}",  # not a caption of this world
    ]
    for text in kept:
        assert rewriter(text) == text
    assert rewriter.kept == len(kept) and rewriter.rewritten == 0
    with pytest.raises(ConfigError, match="max_edits"):
        syn.SyntheticRewriter(max_edits=0)


def test_rewriter_reads_noisy_captions_of_a_world(world):
    """With the world's own captioner (noise 0.1): every caption parses, and a one-edit annotated pair is
    rewritten into at most two edits."""
    captioner = syn.SyntheticCaptioner(world, noise=0.1, seed=0)
    scenes = syn.load_scenes(world)
    assert all(syn.parse_caption(captioner.caption_of(i)) is not None for i in scenes)
    rewriter = syn.SyntheticRewriter(max_edits=2)
    exact = syn.SyntheticCaptioner(world)
    queries = json.loads((Path(world) / "cirr" / "captions" / "cap.rc2.train.json").read_text())
    texts = [rewriter(f"{exact.caption_of(q['target_hard'])} instead of {exact.caption_of(q['reference'])}")
             for q in queries]
    assert rewriter.rewritten == len(queries)  # exact captions of annotated pairs: 1-2 edits, always rewritten
    assert all(" instead of " not in text for text in texts)


def test_duplicates_are_pixel_identical_within_and_across_splits(tmp_path):
    """A few percent of each split are copies of another image; dedup finds exactly those groups."""
    from cir_plugins.data.dedup import find_duplicates

    size = dict(TINY, n_train_unlabelled=200, n_test_distractors=100, duplicate_rate=0.05)
    root = syn.make_world(tmp_path / "w", seed=5, size=size, image_size=36)
    copies = json.loads((root / "synthetic" / "world.json").read_text())["stats"]["duplicates"]
    split_of = {i: s for s in ("train", "val", "test") for i in cp.load_cirr(root, s).gallery_ids}
    sizes = {s: sum(1 for v in split_of.values() if v == s) for s in ("train", "val", "test")}
    for split in sizes:
        made = sum(1 for c in copies if split_of[c] == split)
        assert made == round(0.05 * (sizes[split] - made))
    within = [c for c, src in copies.items() if split_of[c] == split_of[src]]
    across = [c for c, src in copies.items() if split_of[c] != split_of[src]]
    assert within and across
    images = {}
    for split in ("train", "val", "test"):
        loaded = cp.load_cirr(root, split, transform="none")
        images.update({i: loaded.images.load_pil(i) for i in loaded.gallery_ids})
    for copy, source in copies.items():
        assert np.array_equal(np.asarray(images[copy]), np.asarray(images[source]))
        assert copy not in {m for s in ("train", "val", "test") for t in cp.load_cirr(root, s).triplets
                            for m in (t.reference, t.target)}
    # grouping every image of the world by pixels merges exactly the copies with their sources
    groups = find_duplicates(list(images), images, show_progress=False)
    found = {}
    for image_id, group in groups.items():
        found.setdefault(group, set()).add(image_id)
    expected = {}
    for copy, source in copies.items():
        expected.setdefault(source, {source}).add(copy)
    assert sorted(map(sorted, (g for g in found.values() if len(g) > 1))) == sorted(map(sorted, expected.values()))
    # the copies come from their own random stream: without them the world is the same
    plain = syn.make_world(tmp_path / "plain", seed=5, size=dict(size, duplicate_rate=0.0), image_size=36)
    for split in ("train", "val", "test"):
        a, b = cp.load_cirr(root, split), cp.load_cirr(plain, split)
        assert [i for i in a.gallery_ids if i not in copies] == b.gallery_ids
        assert [(t.reference, t.texts, t.target) for t in a.triplets] == [(t.reference, t.texts, t.target)
                                                                          for t in b.triplets]
    with pytest.raises(ConfigError, match="duplicate_rate"):
        syn.WorldConfig(duplicate_rate=0.9)


def test_captioner_word_budget_drops_detail_least_salient_first(tmp_path):
    """words=k stands in for "describe the image in k words": positions go first, then sizes, then colours, then
    trailing objects; a caption already within the budget is unchanged."""
    from cir_plugins.data.synthetic_scenes import describe_scene

    root = syn.make_world(tmp_path / "w", seed=1, size=TINY)
    full = syn.SyntheticCaptioner(root)
    terse = syn.SyntheticCaptioner(root, words=8)
    ids = list(full.scenes)
    short, whole = terse(ids), full(ids)
    assert all(len(text.split()) <= 8 for text in short)
    assert any(a != b for a, b in zip(short, whole))
    assert all(a == b for a, b in zip(short, whole) if len(b.split()) <= 8)
    two = [{"shape": "triangle", "color": "purple", "size": "small", "row": 2, "col": 0},
           {"shape": "star", "color": "cyan", "size": "large", "row": 0, "col": 0}]
    assert describe_scene(two).startswith("a large cyan star at the top left")
    assert describe_scene(two, words=8) == "a cyan star and a purple triangle"  # reading order kept
    assert describe_scene(two, words=5) == "a star and a triangle"
    assert describe_scene(two, words=3) == "a star"
    for bad in (0, 1, True, 2.5):
        with pytest.raises(ValueError, match="words"):
            syn.SyntheticCaptioner(root, words=bad)
