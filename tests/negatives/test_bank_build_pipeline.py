"""NegativeBank.build's pipeline (issue 20 item 4): batches reach the device through _prefetch_to in order,
the finite check is deferred to one sync without a shard cache, and with a cache nothing non-finite is
ever written to it."""

from __future__ import annotations

import pytest
import torch
from _toy import make_model, make_world
from safetensors.torch import load_file

from cir_plugins.errors import NonFiniteError
from cir_plugins.negatives.bank import NegativeBank, _prefetch_to


def test_prefetch_yields_every_batch_in_order_on_the_cpu():
    batches = [(torch.arange(i, i + 3), torch.randn(3, 2)) for i in range(5)]
    got = list(_prefetch_to(iter(batches), torch.device("cpu")))
    assert len(got) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, got))
    assert list(_prefetch_to(iter([]), torch.device("cpu"))) == []


@pytest.mark.parametrize("cached", [False, True])
def test_non_finite_images_are_named_and_never_cached(tmp_path, cached):
    images, _, _ = make_world(n_images=12, n_train=4, n_val=2)
    model = make_model()
    ids = list(images)
    images = dict(images)
    images[ids[9]] = torch.full_like(images[ids[9]], float("nan"))  # in the third batch of 4
    cache = tmp_path / "shards" if cached else None
    with pytest.raises(NonFiniteError) as caught:
        NegativeBank.build(model, ids, images, batch_size=4, show_progress=False, cache_dir=cache, dedup=False)
    assert ids[9] in str(caught.value) and ids[8] not in str(caught.value)
    if cached:
        shards = list(cache.rglob("*.safetensors"))
        assert shards  # the two good batches before it were kept for a resume
        for shard in shards:
            assert all(torch.isfinite(t.float()).all() for t in load_file(str(shard)).values())
