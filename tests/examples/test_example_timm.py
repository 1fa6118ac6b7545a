"""The timm + BERT + TIRG example (examples/timm_tirg): a model no CIR paper ships, loaded by path from
a tiny saved checkpoint, wrapped in <= 10 lines, trained in stage 2 without running the backbone,
and run end to end (augment -> stage 2 -> evaluate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cir_plugins as cp
from cir_plugins.protocol import parameter_split

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "timm_tirg"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _example_helpers import check_integration_files, random_images, run_readme_commands  # noqa: E402

from examples.timm_tirg import run as tirg_run  # noqa: E402
from examples.timm_tirg.model import TimmTIRG, make_tiny_checkpoint  # noqa: E402
from examples.timm_tirg.wrap import load  # noqa: E402

TEXTS = ["make it red", "add a small blue star at the top left", "remove the circle"]


# the dev box's 2 cores are shared: one intra-op thread avoids oversubscription stalls
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tirg_tiny"), tirg_run.WORLD_WORDS)


@pytest.fixture()
def model(checkpoint):
    return load(str(checkpoint))


def test_wrapping_code_is_at_most_10_lines_and_quoted_in_readme():
    check_integration_files(EXAMPLE)


def test_loads_by_path_and_passes_check_model(model):
    assert isinstance(model.model, TimmTIRG)
    assert model.similarity == "dot"
    x = torch.stack(list(random_images(5).values()))
    report = cp.check_model(model, x[:3], TEXTS, x)
    assert report.ok, str(report)
    assert report.image_shape == (5, 48) and report.query_shape == (3, 48) and report.reference_shape == (3, 48)
    split = parameter_split(model, x[:3], TEXTS, x)
    query_roots = {n.split(".")[1] for n in split.query}
    assert query_roots == {"text_encoder", "text_projection", "gate", "residual", "gate_weight", "residual_weight"}
    assert {n.split(".")[1] for n in split.target} == {"image_backbone", "image_projection"}
    # check_model leaves the frozen backbone's batch-norm layers in eval mode
    assert not any(m.training for m in model.image_backbone.modules())


def test_save_and_load_round_trip_is_exact(model, tmp_path):
    x = torch.stack(list(random_images(3, seed=4).values()))
    saved = model.model.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in saved.iterdir()) == ["heads.safetensors", "image", "text", "tirg.json"]
    again = TimmTIRG.from_pretrained(saved)
    with torch.no_grad():
        torch.testing.assert_close(again.embed_image(x), model.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(again.compose(again.image_features(x), TEXTS),
                                   model.compose_query(model.encode_reference(x), TEXTS), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="tirg.json"):
        TimmTIRG.from_pretrained(tmp_path)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_composition_matches_a_plain_float64_reference(model, pooling):
    """compose == the TIRG formula written out in float64, batch of odd size with ragged texts."""
    tirg = model.model
    tirg.text_pooling = pooling
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(5, 48, generator=g)
    texts = ["red", "make the large circle a small blue star please", "add a cube", "it", "move it left"]
    with torch.no_grad():
        ours = tirg.compose(ref, texts)
        # reference: each text alone (no padding), the formula in float64
        expected = []
        for i, text in enumerate(texts):
            batch = tirg.tokenizer([text], return_tensors="pt")
            hidden = tirg.text_encoder(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state[0].double()
            pooled = hidden[0] if pooling == "cls" else hidden.mean(0)
            t = pooled @ tirg.text_projection.weight.double().T + tirg.text_projection.bias.double()
            x = ref[i].double()
            joint = torch.cat([x, t])

            def mlp(seq):
                h = torch.relu(joint @ seq[0].weight.double().T + seq[0].bias.double())
                return h @ seq[2].weight.double().T + seq[2].bias.double()

            q = tirg.gate_weight.double() * torch.sigmoid(mlp(tirg.gate)) * x + tirg.residual_weight.double() * mlp(
                tirg.residual)
            expected.append(F.normalize(q, dim=0))
    torch.testing.assert_close(ours.double(), torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_stage2_freezes_the_backbone_and_never_runs_it(model):
    imgs = random_images(11)
    ids = list(imgs)
    triplets = [cp.Triplet(ids[k], (TEXTS[k % 3],), ids[(k + 2) % 11]) for k in range(11)]
    bank = cp.NegativeBank.build(model, ids, imgs, batch_size=4, show_progress=False)
    assert tuple(bank.embeddings.shape) == (11, 48)
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    bank_before = bank.embeddings.clone()
    config = cp.Stage2Config(epochs=1, batch_size=4, lr=1e-3, show_progress=False)
    trainer = cp.Stage2Trainer(model, bank, triplets, imgs, config=config)
    calls = []
    handle = model.image_backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        history = trainer.fit()
    finally:
        handle.remove()
    assert calls == [] and history[-1]["steps"] >= 2
    assert torch.equal(bank.embeddings, bank_before)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = [n for n in before if n.startswith(("model.image_backbone", "model.image_projection"))]
    assert any("running_mean" in n for n in frozen)  # batch-norm statistics are covered too
    assert frozen and not changed & set(frozen)
    assert {n.split(".")[1] for n in changed} >= {"text_encoder", "text_projection", "gate", "residual"}


@pytest.mark.slow
def test_one_augment_stage2_evaluate_cycle(checkpoint, tmp_path):
    args = argparse.Namespace(model=str(checkpoint), world=str(tmp_path / "world"), world_size="tiny", data=None,
                              out=str(tmp_path / "run"), epochs=1, batch_size=16, lr=1e-4, steps_per_epoch=3, seed=0,
                              progress=False)
    results = tirg_run.cycle(args)
    assert results["bank_shape"] == [168, 48]  # every train image of the tiny world
    assert results["triplets"]["total"] > results["triplets"]["annotated"] == 24
    for when in ("before", "after"):
        assert set(results[when]) >= {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rmean"}
        assert all(0.0 <= v <= 100.0 for v in results[when].values())
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    run_readme_commands(EXAMPLE, tmp_path)


def test_init_command_builds_a_checkpoint_from_a_timm_name_and_a_text_path(checkpoint, tmp_path, capsys):
    code = tirg_run.main(["init", str(tmp_path / "fresh"), "--image-model", "test_resnet",
                          "--text-model", str(checkpoint / "text"), "--embed-dim", "24"])
    assert code == 0 and "written" in capsys.readouterr().out
    fresh = TimmTIRG.from_pretrained(tmp_path / "fresh")
    assert fresh.embed_dim == 24 and fresh.image_backbone.num_features == 96
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert fresh.compose(fresh.image_features(x), TEXTS[:2]).shape == (2, 24)


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(ValueError, match="text_pooling"):
        TimmTIRG(model.image_backbone, model.text_encoder, model.tokenizer, text_pooling="max")
    with pytest.raises(ValueError, match=r"\(B, D\) and B texts"):
        model.compose_query(torch.randn(2, 48), ["only one text"])
