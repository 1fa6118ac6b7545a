import json

import numpy as np
import pytest
import torch
from PIL import Image

import cir_plugins as cp
from cir_plugins.errors import ConfigError, ModelProtocolError
from cir_plugins.positives.augmenter import AugmentConfig, TripletAugmenter


class Store(dict):
    """id -> (3, H, W) tensor, plus the exact PIL image (like ImageStore.load_pil)."""

    def __init__(self, pil):
        super().__init__({k: torch.from_numpy(np.asarray(v, dtype=np.float32) / 255).permute(2, 0, 1)
                          for k, v in pil.items()})
        self.pil = pil

    def load_pil(self, image_id):
        return self.pil[image_id]


def make_store(n=40, seed=0, duplicates=(("d1", "im3"), ("d2", "im3"), ("d3", "im7"))):
    rng = np.random.default_rng(seed)
    pil = {f"im{k}": Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), "RGB") for k in range(n)}
    for copy, original in duplicates:
        pil[copy] = pil[original].copy()
    return Store(pil)


class ColourCaptioner:
    """Deterministic captions from pixels; counts calls."""

    name = "colour-v1"

    def __init__(self, same=()):
        self.calls, self.captioned, self.same = 0, [], set(same)

    def __call__(self, ids, images):
        self.calls += 1
        self.captioned.extend(ids)
        return ["a plain image" if i in self.same else f"an image with red {img.getpixel((0, 0))[0]} and green "
                f"{img.getpixel((1, 1))[1]}" for i, img in zip(ids, images)]


def encoder(batch):
    return batch.flatten(1)  # (n, 3*6*5)


def test_augment_end_to_end_dedup_records_and_summary(tmp_path):
    store = make_store()
    aug = TripletAugmenter(
        ColourCaptioner(),
        encoder,
        config=AugmentConfig(templates="cirr", rank_window=(2, 10), partners_per_image=2, seed=0),
        cache_dir=tmp_path,
        show_progress=False,
    )
    result = aug.augment(list(store), store)
    triplets, summary, groups = result.triplets, result.summary, result.groups
    assert summary["images"] == 43 and summary["unique_images"] == 40
    assert summary["duplicate_groups"] == 2 and summary["duplicates_merged"] == 3
    assert groups["d1"] == groups["d2"] == "im3" and groups["d3"] == "im7"
    assert "last_summary" not in vars(aug) and "last_groups" not in vars(aug)  # not set on the augmenter
    assert summary["queries"] == 40 and summary["pairs"] == 80 and summary["triplets"] == 80
    assert set(summary["seconds"]) == {"embed", "dedup", "pair", "caption", "template"}
    for t in triplets:
        assert t.source == "generated" and t.reference != t.target
        assert {t.reference, t.target}.isdisjoint({"d1", "d2", "d3"})  # only group representatives
        r, g = t.meta["reference_caption"], t.meta["target_caption"]
        assert t.texts == (f"{g} instead of {r}", f"Unlike {r}, I want {g}")
        assert list(t.meta["templates"]) == list(cp.positives.templates.PRESETS["cirr"])
    # every partner is inside the rank window of the brute-force ranking over the representatives
    reps = [i for i in store if groups[i] == i]
    x = torch.nn.functional.normalize(torch.stack([store[i].flatten() for i in reps]).double(), dim=1)
    full = x @ x.T
    for t in triplets:
        q = reps.index(t.reference)
        ranked = sorted((j for j in range(len(reps)) if j != q), key=lambda j: (-float(full[q, j]), j))
        assert reps.index(t.target) in ranked[2:10]


def test_same_seed_same_triplets_other_seed_other_pairs():
    store = make_store()

    def run(seed):
        aug = TripletAugmenter(
            ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0.1, 0.6), seed=seed), show_progress=False
        )
        return [(t.reference, t.texts, t.target) for t in aug.augment(list(store), store).triplets]

    assert run(3) == run(3)
    pairs = lambda triplets: [(r, g) for r, _, g in triplets]  # noqa: E731
    assert pairs(run(3)) != pairs(run(4))


def test_second_run_captions_nothing_new_and_cache_is_per_captioner(tmp_path):
    store = make_store()
    first_captioner = ColourCaptioner()
    aug = TripletAugmenter(
        first_captioner, encoder, config=AugmentConfig(rank_window=(-1, 0)), cache_dir=tmp_path, show_progress=False
    )
    first = aug.augment(list(store), store)
    assert first_captioner.calls > 0 and first.summary["captions"]["new"] > 0
    second_captioner = ColourCaptioner()
    again = TripletAugmenter(
        second_captioner, encoder, config=AugmentConfig(rank_window=(-1, 0)), cache_dir=tmp_path, show_progress=False
    )
    second = again.augment(list(store), store)
    assert [t.texts for t in second.triplets] == [t.texts for t in first.triplets]
    assert second_captioner.calls == 0 and second.summary["captions"]["new"] == 0

    class Other(ColourCaptioner):
        name = "other-v1"

    other = TripletAugmenter(
        Other(), encoder, config=AugmentConfig(rank_window=(-1, 0)), cache_dir=tmp_path, show_progress=False
    )
    assert other.cache_path != aug.cache_path and other.augment(list(store), store).summary["captions"]["new"] > 0


def test_refer_only_subsample_same_caption_skip_and_groups():
    store = make_store(duplicates=())
    annotated = [cp.Triplet("im1", ["x"], "im2"), cp.Triplet("im5", ["y"], "im9"), cp.Triplet("zz", ["z"], "im9")]
    aug = TripletAugmenter(
        ColourCaptioner(),
        encoder,
        config=AugmentConfig(rank_window=(-1, 0), partners_per_image=3, refer_only=True),
        show_progress=False,
    )
    triplets = aug.augment(list(store), store, annotated).triplets
    assert {t.reference for t in triplets} == {"im1", "im5"} and len(triplets) == 6

    sub = TripletAugmenter(
        ColourCaptioner(),
        encoder,
        config=AugmentConfig(rank_window=(-1, 0), partners_per_image=2, max_triplets=7, seed=1),
        show_progress=False,
    )
    subset = sub.augment(list(store), store)
    full = TripletAugmenter(
        ColourCaptioner(),
        encoder,
        config=AugmentConfig(rank_window=(-1, 0), partners_per_image=2, seed=1),
        show_progress=False,
    ).augment(list(store), store)
    keys = [(t.reference, t.target) for t in full.triplets]
    assert len(subset.triplets) == 7 and subset.summary["triplets_before_subsample"] == 80
    positions = [keys.index((t.reference, t.target)) for t in subset.triplets]
    assert positions == sorted(positions)

    same = {f"im{k}" for k in range(0, 40, 2)}
    dup_caps = TripletAugmenter(
        ColourCaptioner(same=same),
        encoder,
        config=AugmentConfig(rank_window=(-1, 0), partners_per_image=39, templates="fashioniq"),
        show_progress=False,
    )
    result = dup_caps.augment(list(store), store)
    assert result.summary["skipped_same_caption"] == 20 * 19
    assert len(result.triplets) == 40 * 39 - 20 * 19
    assert all(t.texts == (t.meta["target_caption"],) for t in result.triplets)

    labels = {i: ("odd" if int(i[2:]) % 2 else "even") for i in store}
    grouped = TripletAugmenter(
        ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0.0, 0.5)), show_progress=False
    )
    assert all(
        labels[t.reference] == labels[t.target] for t in grouped.augment(list(store), store, groups=labels).triplets
    )


def test_hf_captioner_through_the_augmenter_caches(tmp_path):
    from test_positives_captioners import build_tiny_blip

    from cir_plugins.positives.captioners import HFCaptioner

    path = build_tiny_blip(tmp_path / "blip")
    store = make_store(n=6, duplicates=())
    captioner = HFCaptioner(str(path), max_new_tokens=4, batch_size=4)
    aug = TripletAugmenter(
        captioner, encoder, config=AugmentConfig(rank_window=(-1, 0)), cache_dir=tmp_path / "cache", show_progress=False
    )
    triplets = aug.augment(list(store), store)
    calls = captioner.generate_calls
    assert calls == 2 and triplets.summary["captions"]["new"] == 6
    assert len(triplets.triplets) + triplets.summary["skipped_same_caption"] == 6
    again = aug.augment(list(store), store)
    assert captioner.generate_calls == calls and again.summary["captions"]["cached"] == 6


def test_result_is_an_object_and_config_round_trips():
    store = make_store()
    config = AugmentConfig(rank_window=(2, 10), seed=0)
    aug = TripletAugmenter(ColourCaptioner(), encoder, config=config, show_progress=False)
    result = aug.augment(list(store), store)
    assert isinstance(result, cp.AugmentResult) and len(result.triplets) == 40
    assert result.summary["triplets"] == 40 and set(result.groups) == set(store)
    assert not hasattr(aug, "last_summary") and not hasattr(aug, "last_groups")
    assert AugmentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="AugmentConfig"):
        TripletAugmenter(ColourCaptioner(), encoder, config={"seed": 0})


def test_bad_arguments():
    with pytest.raises(ModelProtocolError):
        TripletAugmenter(lambda ids, imgs: ids, encoder)
    with pytest.raises(ModelProtocolError):
        TripletAugmenter(ColourCaptioner(), 42)
    with pytest.raises(ConfigError):
        TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(5, 1)))
    with pytest.raises(ConfigError):
        TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(max_triplets=0))
    with pytest.raises(ConfigError):
        TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(templates="{colour}"))
    store = make_store(n=4, duplicates=())
    with pytest.raises(ConfigError):
        TripletAugmenter(
            ColourCaptioner(), encoder, config=AugmentConfig(refer_only=True), show_progress=False
        ).augment(list(store), store)


def test_tensor_images_are_grouped_by_their_exact_values_as_the_bank_groups_them():
    # a plain id -> tensor mapping: a tensor that is an affine copy of another looks the same once min-max scaled
    # into a picture, but it is a different image; the augmenter groups as find_duplicates (and the bank) do
    from cir_plugins.data.dedup import find_duplicates

    gen = torch.Generator().manual_seed(0)
    images = {f"i{k}": torch.rand(3, 6, 5, generator=gen) for k in range(12)}
    images["twin"] = images["i0"] * 2 + 1  # other values, same picture after scaling
    images["copy"] = images["i1"].clone()  # the same values: one group
    augmenter = TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3)),
                                 show_progress=False)
    result = augmenter.augment(list(images), images)
    assert result.groups["twin"] == "twin" and result.groups["copy"] == "i1"
    assert result.groups == find_duplicates(list(images), images)


def test_always_shows_the_bars_on_a_redirected_stderr(capsys):
    # "always" (`--progress always`, e.g. a torchrun log file) reaches every bar of the run, not just True
    store = make_store(n=12, duplicates=())
    TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3)),
                     show_progress="always").augment(list(store), store)
    err = capsys.readouterr().err
    assert "dedup: hashing pixels" in err and "captioning (colour-v1)" in err and "pairing" in err
