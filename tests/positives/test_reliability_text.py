"""Text over the tokenizer limit: each example model truncates it and warns once per model (not once
per batch, and never for texts that fit), naming the limit. Tiny checkpoints saved and loaded by path."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
for path in (str(REPO), str(REPO / "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

import _tiny_clip  # noqa: E402

from examples.blip2_sprc import run as blip2_run  # noqa: E402
from examples.blip2_sprc.model import SPRCRetriever  # noqa: E402
from examples.blip2_sprc.model import make_tiny_checkpoint as make_tiny_blip2  # noqa: E402
from examples.clip4cir.model import CLIP4Cir  # noqa: E402
from examples.timm_tirg import run as tirg_run  # noqa: E402
from examples.timm_tirg.model import TimmTIRG  # noqa: E402
from examples.timm_tirg.model import make_tiny_checkpoint as make_tiny_tirg  # noqa: E402

WORDS = "make it red and add a small blue star at the top left"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", _tiny_clip.words_of([WORDS]),
                                     seed=0, image_size=24, patch_size=8, width=32, projection_dim=16)


def _clip(clip_dir):
    model = CLIP4Cir.from_pretrained(str(clip_dir), fusion="sum").eval()

    def tokenize(texts):
        return model.tokenize(texts)["input_ids"]  # (B, L)

    return model, tokenize, model.max_length, "examples.clip4cir.model"


def _tirg(tmp_path_factory):
    model = TimmTIRG.from_pretrained(str(make_tiny_tirg(tmp_path_factory.mktemp("tirg"), tirg_run.WORLD_WORDS)))

    def tokenize(texts):
        with torch.no_grad():
            return model.embed_text(texts, torch.device("cpu"))  # (B, D): the tokenizer runs inside

    return model, tokenize, model.max_text_length, "examples.timm_tirg.model"


def _blip2(tmp_path_factory):
    model = SPRCRetriever.from_pretrained(str(make_tiny_blip2(tmp_path_factory.mktemp("blip2"),
                                                              blip2_run.WORLD_WORDS)))

    def tokenize(texts):
        return model._tokenize(texts, torch.device("cpu"))[0]  # (B, L)

    return model, tokenize, model.max_text_length, "examples.blip2_sprc.model"


@pytest.fixture(params=["clip4cir", "timm_tirg", "blip2_sprc"])
def example(request, clip_dir, tmp_path_factory):
    if request.param == "clip4cir":
        return _clip(clip_dir)
    if request.param == "timm_tirg":
        return _tirg(tmp_path_factory)
    return _blip2(tmp_path_factory)


def _truncation_warnings(caplog, logger_name):
    return [r for r in caplog.records if r.name == logger_name and r.levelno == logging.WARNING
            and "truncat" in r.getMessage()]


def test_long_text_is_truncated_and_warned_once(example, caplog):
    model, tokenize, limit, logger_name = example
    long_text = " ".join([WORDS] * 20)
    with caplog.at_level(logging.WARNING, logger=logger_name):
        tokenize(["make it red", "add a star"])
        assert _truncation_warnings(caplog, logger_name) == []  # texts that fit: no warning
        out = tokenize(["make it red", long_text])
        tokenize([long_text, long_text])
        tokenize([long_text])
    warnings = _truncation_warnings(caplog, logger_name)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert str(limit) in warnings[0].getMessage()
    if out.dtype == torch.long:  # token ids: the long text was cut to the limit
        assert out.shape[1] == limit
