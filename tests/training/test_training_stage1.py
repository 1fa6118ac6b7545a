"""Stage1Trainer: in-batch loss against a plain reference, duplicate targets masked, trainable override."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _toy import make_model, make_world

from cir_plugins.data.triplet import Triplet
from cir_plugins.errors import ConfigError
from cir_plugins.training import Stage1Config, Stage1Trainer


def cfg(**kw):
    return Stage1Config(**(dict(epochs=1, batch_size=64, lr=1e-12, show_progress=False) | kw))


def _plain_loss(model, triplets, images, groups, tau):
    """Reference, per query in float64: the positive is its own target; the negatives are the other
    distinct targets of the batch, each counted once (a target repeated in the batch, or a duplicate
    of it, is one candidate)."""
    with torch.no_grad():
        refs = torch.stack([images[t.reference] for t in triplets])
        q = F.normalize(model.compose_query(model.encode_reference(refs), [t.texts[0] for t in triplets]), dim=-1)
        g = F.normalize(model.encode_image(torch.stack([images[t.target] for t in triplets])), dim=-1)
        scores = (q.double() @ g.double().T) / tau  # (B, B)
        key = [groups.get(t.target, t.target) for t in triplets]
        losses = []
        for i in range(len(triplets)):
            negatives = {}
            for j in range(len(triplets)):
                if key[j] != key[i]:
                    negatives.setdefault(key[j], scores[i, j])
            row = torch.stack([scores[i, i], *negatives.values()])
            losses.append(torch.logsumexp(row, 0) - scores[i, i])
        return float(torch.stack(losses).mean())


def test_in_batch_loss_with_duplicates_matches_plain_reference():
    images, train, _ = make_world(n_train=13)
    ids = list(images)
    train = train + [Triplet(train[0].reference, ("blue",), train[0].target),        # same target twice
                     Triplet(train[1].reference, ("red",), ids[-1])]
    groups = {ids[-1]: "dup", train[1].target: "dup"}                                  # a duplicate pair
    images = dict(images, **{ids[-1]: images[train[1].target].clone()})               # pixel-identical
    model = make_model()
    trainer = Stage1Trainer(model, train, images, config=cfg(), groups=groups)
    plan = trainer.sampler.epoch_plan(0)[0]
    ordered = [train[s.index] for s in plan]
    expected = _plain_loss(model, ordered, images, groups, 0.01)
    history = trainer.fit()
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_both_towers_train_by_default_and_override_narrows():
    images, train, _ = make_world(n_train=20)
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Stage1Trainer(model, train, images, config=cfg(lr=1e-2, batch_size=8)).fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"image_proj.weight", "fuse.weight", "text.weight"} <= changed

    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Stage1Trainer(model, train, images, config=cfg(lr=1e-2, batch_size=8), trainable=["fuse"]).fit()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"fuse.weight", "fuse.bias"}
    with pytest.raises(ConfigError, match="combiner"):
        Stage1Trainer(make_model(), train, images, config=cfg(), trainable=["combiner"])
