"""Configs (validation, JSON round-trip) and the epoch sampler (annotated share, determinism, texts)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import ConfigError
from cir_plugins.training import Stage1Config, Stage2Config
from cir_plugins.training.sampler import EpochSampler


def test_round_trip_json():
    cfg = Stage2Config(epochs=4, betas=(0.8, 0.99), mask_reference=False, annotated_fraction=0.25)
    again = Stage2Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert Stage1Config().temperature == 0.01 and Stage2Config().temperature == 0.02
    assert Stage2Config().lr == 2e-5 and Stage2Config().weight_decay == 0.01


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=-1), dict(lr=0.0), dict(amp="fp8"),
                                 dict(schedule="step"), dict(annotated_fraction=1.5), dict(max_grad_norm=0),
                                 dict(temperature_range=(0.5, 0.1)), dict(warmup_steps=-1),
                                 dict(learn_temperature=True, temperature=5.0), dict(grad_accum_steps=0)])
def test_invalid_values_are_refused(bad):
    with pytest.raises(ConfigError):
        Stage2Config(**bad)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="bogus"):
        Stage2Config.from_dict({"bogus": 1})


def _triplets(n_annotated, n_generated):
    out = [Triplet(f"a{i}", ("x",), f"t{i}") for i in range(n_annotated)]
    out += [Triplet(f"g{i}", ("one", "two", "three"), f"u{i}", source="generated") for i in range(n_generated)]
    return out


def test_annotated_fraction_is_hit_each_epoch():
    triplets = _triplets(7, 93)
    sampler = EpochSampler(triplets, 9, seed=3, annotated_fraction=0.5, steps_per_epoch=11)
    for epoch in range(3):
        plan = sampler.epoch_plan(epoch)
        flat = [s for batch in plan for s in batch]
        assert len(plan) == 11 and len(flat) == 99
        kinds = Counter(triplets[s.index].source for s in flat)
        assert kinds["annotated"] == round(0.5 * 99)
        counts = Counter(s.index for s in flat if triplets[s.index].source == "annotated")
        assert max(counts.values()) - min(counts.values()) <= 1  # repeated evenly
        generated = [s.index for s in flat if triplets[s.index].source == "generated"]
        assert len(set(generated)) == len(generated)  # subsampled without repeats


def test_plan_is_deterministic_and_varies_by_epoch():
    triplets = _triplets(20, 30)
    a = EpochSampler(triplets, 8, seed=1)
    b = EpochSampler(triplets, 8, seed=1)
    assert a.epoch_plan(2) == b.epoch_plan(2)
    assert a.epoch_plan(0) != a.epoch_plan(1)
    flat = [s.index for batch in a.epoch_plan(0) for s in batch]
    assert sorted(flat) == list(range(50)) and len(a) == 7


def test_texts_drawn_from_all_variants():
    triplets = _triplets(0, 60)
    sampler = EpochSampler(triplets, 16, seed=0)
    drawn = Counter(s.text_index for batch in sampler.epoch_plan(0) for s in batch)
    assert set(drawn) == {0, 1, 2}


def test_fraction_without_that_kind_is_refused():
    with pytest.raises(ConfigError, match="generated"):
        EpochSampler(_triplets(5, 0), 4, annotated_fraction=0.5)
