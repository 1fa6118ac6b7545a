"""The rewrite step and the text-length fallback inside generation (TripletAugmenter, `cir-plugins augment`) and
training (`cir-plugins stage1`), and the release's equal-caption pairs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from _toy import factory_source
from test_cli_new_user import cirr_workspace  # enc.py there: pooled pixels, 8 dims
from test_positives_augmenter import ColourCaptioner, encoder, make_store
from test_positives_rewriter import build_tiny_chat_model

import cir_plugins as cp
from cir_plugins.cli import main
from cir_plugins.errors import ConfigError
from cir_plugins.positives.augmenter import AugmentConfig, TripletAugmenter
from cir_plugins.positives.templates import fit_generated_texts, text_limit_of

# the toy CIR model of the training tests, declaring a text limit of 6 whitespace words
FACTORY = factory_source("model.max_text_tokens = 6", "model.count_text_tokens = lambda text: len(text.split())")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny-lm")))


def test_augmenter_runs_the_llm_rewriter_once_per_pair_and_caches_it(tiny, tmp_path):
    store = make_store(n=12, duplicates=())
    rewriter = cp.LLMRewriter(tiny, max_new_tokens=6, max_words=6)
    def augment():
        return TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3)), rewriter=rewriter,
                                cache_dir=tmp_path, show_progress=False).augment(list(store), store)

    result = augment()
    rewrite = result.summary["rewrite"]
    assert rewrite["rewritten"] + rewrite["fallback"] == len(result.triplets) == 12 and rewrite["new"] == 12
    assert "rewrite" in result.summary["seconds"]
    for t in result.triplets:
        assert t.meta["rewriter"] == rewriter.name
        if t.meta["templates"] == [f"rewrite:{rewriter.name}"]:
            assert len(t.texts) == 1 and len(t.texts[0].split()) <= 6
        else:
            assert list(t.meta["templates"]) == list(cp.positives.templates.PRESETS["cirr"])
    assert len(list(tmp_path.glob("rewrites-*.jsonl"))) == 1
    again = augment()
    assert again.summary["rewrite"]["cached"] == 12 and again.summary["rewrite"]["model_calls"] == 0
    assert [t.texts for t in again.triplets] == [t.texts for t in result.triplets]


def test_per_text_hook_and_rewriter_are_one_step():
    store = make_store(n=10, duplicates=())
    hooked = TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3)),
                              rewriter=str.upper, show_progress=False).augment(list(store), store)
    plain = TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3)),
                             show_progress=False).augment(list(store), store)
    assert [tuple(x.upper() for x in t.texts) for t in plain.triplets] == [t.texts for t in hooked.triplets]
    assert hooked.summary["rewrite"]["rewritten"] == 10 and plain.summary["rewrite"] is None


def test_equal_captions_are_dropped_by_default_and_kept_as_the_release_does():
    store = make_store(n=10, duplicates=())
    same = {f"im{k}" for k in range(10)}  # every image "a plain image"
    config = AugmentConfig(templates="fashioniq", rank_window=(0, 3))
    dropped = TripletAugmenter(ColourCaptioner(same=same), encoder, config=config,
                               show_progress=False).augment(list(store), store)
    assert len(dropped.triplets) == 0 and dropped.summary["skipped_same_caption"] == 10
    keep = dataclasses.replace(config, keep_equal_captions=True)
    kept = TripletAugmenter(ColourCaptioner(same=same), encoder, config=keep, show_progress=False).augment(list(store),
                                                                                                        store)
    assert len(kept.triplets) == 10 and kept.summary["kept_same_caption"] == 10
    assert all(t.texts == ("a plain image",) for t in kept.triplets)  # "{target}": a valid description of the target


def test_long_texts_fall_back_to_the_target_caption_and_are_counted():
    store = make_store(n=10, duplicates=())
    model = type("M", (), {"max_text_tokens": 9, "count_text_tokens": staticmethod(lambda text: len(text.split()))})()
    limit = text_limit_of(model)
    result = TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3),
                              max_tokens=limit["max_tokens"]), count_tokens=limit["count_tokens"],
                              show_progress=False).augment(list(store), store)
    # captions have 8 words: every templated text is longer than 9, so each becomes the target caption
    assert result.summary["text_fallbacks"] == 20 and result.summary["text_limit"] == {"max_tokens": 9,
                                                                                      "fallback": "target"}
    assert all(t.texts == (t.meta["target_caption"],) for t in result.triplets)
    cut = TripletAugmenter(ColourCaptioner(), encoder, config=AugmentConfig(rank_window=(0, 3), fallback="truncate",
                           max_tokens=limit["max_tokens"]), count_tokens=limit["count_tokens"],
                           show_progress=False).augment(list(store), store)
    assert all(len(text.split()) == 9 for t in cut.triplets for text in t.texts)


def test_text_limit_of_reads_a_tokenizer_and_fit_generated_texts_keeps_annotated():
    class Tokenizer:
        model_max_length = 4

        def __call__(self, text, truncation=True, verbose=True):
            return {"input_ids": [0, *range(len(text.split())), 1]}  # BOS + words + EOS

    model = type("M", (), {"tokenizer": Tokenizer()})()
    limit = text_limit_of(model)
    assert limit["max_tokens"] == 4 and limit["count_tokens"]("one two three") == 5
    assert text_limit_of(object()) == {}
    generated = cp.Triplet("a", ["blue instead of red", "ok"], "b", source="generated",
                           meta={"target_caption": "blue"})
    no_caption = cp.Triplet("c", ["a long text here"], "d", source="generated")
    annotated = cp.Triplet("e", ["an annotated long text"], "f")
    out, counts = fit_generated_texts([generated, no_caption, annotated], **limit)
    assert out[0].texts == ("blue", "ok") and out[1] is no_caption and out[2] is annotated
    assert counts == {"texts": 3, "fallbacks": 1, "no_caption": 1}


def _tree(tmp_path, monkeypatch):  # captions of 6 words: at the model's limit, so a long template overflows it
    return cirr_workspace(tmp_path, monkeypatch, caption="a photo with the number {k}", factory=FACTORY)


def test_augment_command_rewriter_and_stage1_long_text_fallback(tiny, tmp_path, monkeypatch, capsys):
    root = _tree(tmp_path, monkeypatch)
    base = ["augment", "--dataset", "cirr", "--root", str(root), "--captioner", "file:captions.json",
            "--pair-encoder", "enc:build", "--image-size", "4", "--no-progress"]
    assert main([*base, "--out", "gen.json", "--rewriter", f"hf:{tiny}", "--rewriter-max-new-tokens", "6",
                 "--rewriter-examples", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(Path("gen.json.summary.json").read_text())
    assert summary["recipe"] == "ours, no rewrite" and summary["rank_window"] == "0.0,0.01"
    assert summary["rewrite"]["rewritten"] + summary["rewrite"]["fallback"] == summary["triplets"] == 18
    assert "rewrite (hf-rewrite:" in printed and "texts over the limit: not checked" in printed
    # a local model folder is a spec too; a bad spec is a one-line error
    assert main([*base, "--out", "gen2.json", "--rewriter", tiny, "--rewriter-max-new-tokens", "6"]) == 0
    assert main([*base, "--out", "gen3.json", "--rewriter", "nowhere/at-all"]) == 2
    assert "unknown rewriter spec" in capsys.readouterr().err
    # templates only (no rewriter): the CIRR texts are 12 words or more, over the toy model's limit of 6 words
    assert main([*base, "--out", "plain.json"]) == 0
    capsys.readouterr()
    train = ["stage1", "--model", "tiny_cir:build", "--dataset", "cirr", "--root", str(root), "--image-size", "4",
             "--generated", "plain.json", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main([*train, "--out", "s1"]) == 0
    assert "over the model's 6-token limit: 36 of 36 replaced by the target caption" in capsys.readouterr().out
    assert main([*train, "--out", "s1-keep", "--long-text", "keep"]) == 0
    assert "over the model's" not in capsys.readouterr().out


def test_recipe_generation_rewriter_key_reaches_the_augmenter(tiny, tmp_path):
    from cir_plugins.recipes import RECIPE_DIR, load_recipe

    data = json.loads((RECIPE_DIR / "clip4cir-cirr.json").read_text())
    assert load_recipe("clip4cir-cirr").generation.rewriter is None  # null by default: the paper's template texts
    assert load_recipe("clip4cir-cirr").to_dict()["generation"]["rewriter"] is None  # and written back as null
    data["generation"]["rewriter"] = f"hf:{tiny}"
    (tmp_path / "clip4cir-cirr.json").write_text(json.dumps(data))
    recipe = load_recipe(str(tmp_path / "clip4cir-cirr.json"))
    assert recipe.generation.rewriter == f"hf:{tiny}" and recipe.to_dict()["generation"]["rewriter"] == f"hf:{tiny}"
    augmenter = TripletAugmenter(ColourCaptioner(), encoder, config=recipe.generation,
                                 rewriter=recipe.generation.rewriter)
    assert isinstance(augmenter.rewriter, cp.LLMRewriter)
    data["generation"]["rewriter"] = 3
    (tmp_path / "clip4cir-cirr.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="generation.rewriter"):
        load_recipe(str(tmp_path / "clip4cir-cirr.json"))
